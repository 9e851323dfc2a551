"""Quota leases, granted and settled by the key authority (Doorman / Envoy quota leasing).

A gateway that admitted every request with a ``ReserveQuota`` round trip paid one RPC
and one ``UPDATE`` per request before generating, and a second pair to settle. A lease
moves that cost from the request to the lease: one statement grants a gateway several
requests of a key's rate limit and a block of its token quota, deducted up front from
the same counters a reservation uses, and the gateway admits requests from it locally
(``federation.keys.lease_book``). Settling the lease, one statement, charges the tokens
its requests really used and gives back the rest, and the requests it did not serve.

Why the limits still hold across any number of gateways: what a lease holds is charged
before any of it is served, under the same row lock as a reservation, so the served sum
never exceeds what was charged. A lease is capped to ``fraction`` of what remains (so a
second gateway is not starved), never outlives the rate window or the quota period it
was charged to (so a window's requests are all served within it), and when the fraction
cannot cover the request that asked, the lease is exact: one request and that request's
tokens capped to what remains, which is ``ReserveQuota``'s reservation.

The trade-off: a gateway that dies leaves its lease charged in full (the row is purged
later, like an unsettled reservation), so a key can be over-charged by at most one
unreturned lease per gateway for the rest of that window or period; it is never
under-charged.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import asyncpg

from federation.errors import ErrorCode, FederationError
from federation.fields import storable
from federation.keys.quota import (
    LOCKED_COUNTER_SQL,
    MAX_TOKENS,
    REQUESTS_STORED,
    TOKENS_STORED,
    QuotaService,
    QuotaStatus,
    quota_status,
    validate_charge,
)

MAX_LEASE_REQUESTS = 2**31 - 1
"""Most requests one lease may ask for (the column is a PostgreSQL integer)."""

# One statement, like _RESERVE_SQL: lock the counter row, roll expired windows over, size
# the lease ($4 requests and $5 tokens wanted, capped to $9 of what remains; exact when
# that cannot cover $6), charge it and record it, or change nothing when the request
# rate is spent or fewer than $7 tokens remain. The plan row comes back either way.
_GRANT_SQL = LOCKED_COUNTER_SQL + f""",
    nxt AS (
        SELECT win.*,
            CASE WHEN minute_over THEN now ELSE minute_start END AS new_minute_start,
            CASE WHEN minute_over THEN 0 ELSE minute_requests::bigint END AS made,
            CASE WHEN period_over THEN now ELSE period_start END AS new_period_start,
            CASE WHEN period_over THEN 0 ELSE period_tokens END AS used
        FROM win
    ),
    room AS (
        SELECT nxt.*,
            greatest(token_quota - used, 0) AS tokens_free,
            floor(greatest(token_quota - used, 0) * f.fraction)::bigint AS tokens_share,
            greatest(1, floor(greatest(rpm - made, 0) * f.fraction))::bigint AS requests_share
        FROM nxt, (SELECT least(greatest($9::float8, 0), 1) AS fraction) f
    ),
    sized AS (
        SELECT room.*,
            (token_quota IS NOT NULL AND tokens_share < $6::bigint) AS exact
        FROM room
    ),
    plan AS (
        SELECT sized.*,
            CASE WHEN exact THEN 1
                 WHEN rpm IS NULL THEN $4::bigint
                 ELSE least($4::bigint, requests_share) END AS lease_requests,
            CASE WHEN token_quota IS NULL THEN greatest($5::bigint, $6::bigint)
                 WHEN exact THEN least($6::bigint, tokens_free)
                 ELSE least(greatest($5::bigint, $6::bigint), tokens_share) END AS reserved,
            (rpm IS NULL OR made + 1 <= rpm) AS requests_fit,
            (token_quota IS NULL OR tokens_free >= $7::bigint) AS tokens_fit,
            least($10::float8,
                  CASE WHEN rpm IS NULL THEN $10::float8 ELSE extract(epoch FROM
                      new_minute_start + interval '1 minute' - now)::float8 END,
                  CASE WHEN token_quota IS NULL OR period IS NULL THEN $10::float8
                       ELSE extract(epoch FROM new_period_start
                                    + make_interval(secs => period) - now)::float8 END
            ) AS valid_seconds
        FROM sized
    ),
    upd AS (
        UPDATE api_key_quotas q SET
            minute_start = plan.new_minute_start,
            minute_requests = {REQUESTS_STORED.format("plan.made + plan.lease_requests")},
            period_start = plan.new_period_start,
            period_tokens = {TOKENS_STORED.format("plan.used + plan.reserved")}
        FROM plan
        WHERE q.tenant_id = plan.tenant_id AND q.key_id = plan.key_id
          AND plan.requests_fit AND plan.tokens_fit
        RETURNING q.key_id
    ),
    ins AS (
        INSERT INTO api_key_quota_reservations
            (tenant_id, key_id, reservation_id, period_start, tokens, created_at, requests,
             minute_start)
        SELECT plan.tenant_id, plan.key_id, $8, plan.new_period_start, plan.reserved,
               plan.now, plan.lease_requests, plan.new_minute_start
        FROM plan JOIN upd USING (key_id)
    )
    SELECT plan.*,
           plan.made + CASE WHEN granted THEN plan.lease_requests ELSE 1 END AS new_requests,
           plan.used + CASE WHEN granted THEN plan.reserved ELSE 0 END AS new_tokens,
           granted
    FROM plan, (SELECT EXISTS (SELECT 1 FROM upd) AS granted) g
"""

# One statement: delete the lease (a second settlement finds nothing) and, while the
# counter is still in the lease's period, swap its tokens for the used ones; while it is
# still in the lease's rate window, give back the requests it did not serve.
_SETTLE_SQL = f"""
    WITH p AS (SELECT coalesce($5::timestamptz, statement_timestamp()) AS now),
    r AS (
        DELETE FROM api_key_quota_reservations r USING api_keys k
        WHERE k.key_id = $1 AND r.tenant_id = k.tenant_id AND r.key_id = k.key_id
          AND r.reservation_id = $2
        RETURNING r.tenant_id, r.key_id, r.period_start, r.tokens, r.requests,
                  r.minute_start, k.quota_period_seconds AS period
    ),
    upd AS (
        UPDATE api_key_quotas q SET
            period_tokens = CASE
                WHEN q.period_start = r.period_start AND (r.period IS NULL OR
                     p.now < r.period_start + make_interval(secs => r.period))
                THEN {TOKENS_STORED.format(
                    "greatest(0, q.period_tokens - r.tokens + $3::bigint)")}
                ELSE q.period_tokens END,
            minute_requests = CASE
                WHEN q.minute_start = r.minute_start
                     AND p.now < r.minute_start + interval '1 minute'
                THEN greatest(0, q.minute_requests - greatest(r.requests - $4::bigint, 0))
                ELSE q.minute_requests END
        FROM r, p
        WHERE q.tenant_id = r.tenant_id AND q.key_id = r.key_id
        RETURNING q.key_id,
            (q.period_start = r.period_start AND (r.period IS NULL OR
             p.now < r.period_start + make_interval(secs => r.period))) AS in_period,
            (q.minute_start = r.minute_start AND
             p.now < r.minute_start + interval '1 minute') AS in_minute
    )
    SELECT r.tokens, r.requests, coalesce(upd.in_period, false) AS in_period,
           coalesce(upd.in_minute, false) AS in_minute
    FROM r LEFT JOIN upd USING (key_id)
"""


@dataclass(frozen=True)
class Lease:
    lease_id: str
    requests: int
    """Requests counted against the rate window for this lease."""
    tokens: int
    """Tokens reserved against the token quota for this lease."""
    limited: bool
    """The key has a token quota: a draw from the lease bounds its generation."""
    valid_seconds: float
    """How long from the grant requests may be admitted from the lease."""
    status: QuotaStatus


@dataclass(frozen=True)
class LeaseSettlement:
    settled: bool
    """False when the lease was already settled, purged or never existed."""
    released_tokens: int
    released_requests: int


@dataclass(frozen=True)
class LeaseRequest:
    """What a gateway asks for: its demand, and the request that is waiting."""

    requests: int
    tokens: int
    need_tokens: int
    min_tokens: int

    def validated(self) -> LeaseRequest:
        if not 1 <= self.requests <= MAX_LEASE_REQUESTS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"requests must be between 1 and {MAX_LEASE_REQUESTS}",
                                  param="requests")
        if not 1 <= self.need_tokens <= MAX_TOKENS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"need_tokens must be between 1 and {MAX_TOKENS}",
                                  param="need_tokens")
        if not 0 <= self.tokens <= MAX_TOKENS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"tokens must be at most {MAX_TOKENS}", param="tokens")
        if not 0 <= self.min_tokens <= self.need_tokens:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "min_tokens must be between 0 and need_tokens",
                                  param="min_tokens")
        return self


class LeaseService:
    """Grants and settles leases on the counters :class:`QuotaService` keeps."""

    def __init__(self, pool: asyncpg.Pool, quotas: QuotaService, *, max_seconds: float,
                 max_fraction: float) -> None:
        self._pool = pool
        self._quotas = quotas
        self._max_seconds = max_seconds
        self._max_fraction = max_fraction

    async def grant(self, key_id: str, tenant_id: str | None, request: LeaseRequest, *,
                    actor: str, at: dt.datetime | None = None) -> Lease:
        """Charge and record a lease, or refuse as :meth:`QuotaService.reserve` does."""
        validate_charge(key_id, request.tokens)
        request = request.validated()
        lease_id = "lse_" + secrets.token_hex(12)
        minimum = max(request.min_tokens, 1)
        row = await self._pool.fetchrow(
            _GRANT_SQL, key_id, tenant_id, at, request.requests, request.tokens,
            request.need_tokens, minimum, lease_id, self._max_fraction, self._max_seconds)
        if row is None:
            raise FederationError(ErrorCode.NOT_FOUND, f"no API key {key_id}", param="key_id")
        status = quota_status(row, 0, 1, charged=bool(row["granted"]))
        if row["granted"]:
            return Lease(lease_id, int(row["lease_requests"]), int(row["reserved"]),
                         row["token_quota"] is not None, max(float(row["valid_seconds"]), 0.0),
                         status)
        await self._quotas.refuse_reservation(key_id, row, status, tokens=request.need_tokens,
                                              min_tokens=minimum, actor=actor)

    async def settle(self, key_id: str, lease_id: str, *, used_tokens: int, used_requests: int,
                     at: dt.datetime | None = None) -> LeaseSettlement:
        """Charge what a lease's requests used and give back the rest; idempotent."""
        validate_charge(key_id, used_tokens, "used_tokens")
        storable(lease_id, "lease_id")
        if used_requests < 0:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "used_requests must not be negative", param="used_requests")
        row = await self._pool.fetchrow(_SETTLE_SQL, key_id, lease_id, used_tokens,
                                        used_requests, at)
        if row is None:
            return LeaseSettlement(False, 0, 0)
        tokens = max(0, int(row["tokens"]) - used_tokens) if row["in_period"] else 0
        requests = max(0, int(row["requests"]) - used_requests) if row["in_minute"] else 0
        return LeaseSettlement(True, tokens, requests)
