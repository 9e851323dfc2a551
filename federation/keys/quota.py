"""Per-key quotas: requests per minute and tokens per period, enforced in PostgreSQL.

A charge is one conditional ``UPDATE … RETURNING``: it rolls an expired window
over, adds the charge, and only matches the row if the result stays within
both limits. PostgreSQL re-evaluates that condition against the newest row
version when concurrent charges collide (READ COMMITTED re-check), so the
limit holds across any number of gateway processes sharing the database;
nothing is charged when either limit would be exceeded.

Windows are fixed and start at the first charge after the previous one ended
(so a client can get at most twice the limit across a window boundary).
Time comes from the database clock (``statement_timestamp()``) so that every
process agrees on it; tests may pin it.

A generation reserves before it starts and settles after it ends
(:meth:`QuotaService.reserve`, :meth:`QuotaService.settle`), each one statement.
Reserving locks the key's counter row (``SELECT … FOR UPDATE``, which under READ
COMMITTED waits for a concurrent charge and then reads its result), counts the
request, adds ``min(tokens, remaining)`` to the period's tokens and records the
reservation, or changes nothing when the request rate is spent or fewer than
``min_tokens`` remain. Settling deletes the reservation (so a second settlement
finds nothing to do) and, only while the counter is still in the period the
reservation was charged to, replaces the reserved tokens with the used ones. A
reservation nobody settles stays charged in full; its row is purged later.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, replace
from typing import NoReturn

import asyncpg

from federation.errors import ErrorCode, FederationError
from federation.fields import storable
from federation.keys import keyformat
from federation.memory.records import AuditEntry
from federation.memory.sink import AuditSink

MAX_TOKENS = 2**62
"""Largest token figure accepted (the counters are PostgreSQL bigints)."""

TOKENS_STORED = f"least({{}}, {MAX_TOKENS - 1})"
"""A token counter as written: saturated below :data:`MAX_TOKENS`, so a stored counter
plus any figure accepted still fits a bigint. A key without a token quota never starts
a new period, and its counter grew (a few charges of MAX_TOKENS) until every charge of
the key overflowed it: INTERNAL for good."""

REQUESTS_STORED = "least({}, 2147483647)"
"""A request counter as written (an integer column), saturated likewise: a lease of
the most requests on a key without a rate limit overflowed it for a minute."""

_WINDOWS = """
    WITH p AS (SELECT coalesce($3::timestamptz, statement_timestamp()) AS now),
    cur AS (
        SELECT q.tenant_id, q.key_id, k.requests_per_minute AS rpm, k.token_quota,
               k.quota_period_seconds AS period, p.now,
               (p.now >= q.minute_start + interval '1 minute') AS minute_over,
               (k.quota_period_seconds IS NOT NULL AND
                p.now >= q.period_start + make_interval(secs => k.quota_period_seconds))
                   AS period_over,
               q.minute_start, q.minute_requests, q.period_start, q.period_tokens
        FROM api_key_quotas q JOIN api_keys k USING (tenant_id, key_id), p
        WHERE q.key_id = $1 AND ($2::text IS NULL OR q.tenant_id = $2)
    ),
    nxt AS (
        SELECT cur.*,
            CASE WHEN minute_over THEN now ELSE minute_start END AS new_minute_start,
            CASE WHEN minute_over THEN 0 ELSE minute_requests END + $4::bigint AS new_requests,
            CASE WHEN period_over THEN now ELSE period_start END AS new_period_start,
            CASE WHEN period_over THEN 0 ELSE period_tokens END + $5 AS new_tokens
        FROM cur
    )
"""

_FITS = (
    "(rpm IS NULL OR new_requests <= rpm) AND (token_quota IS NULL OR new_tokens <= token_quota)"
)

_CHECK_SQL = _WINDOWS + f"SELECT nxt.*, ({_FITS}) AS fits FROM nxt"

# The condition is on the row being updated (q), not on the CTE snapshot, so that the
# READ COMMITTED re-check after a concurrent charge sees the newest counters.
_CHARGE_SQL = _WINDOWS + """
    UPDATE api_key_quotas q SET
        minute_start = CASE WHEN nxt.now >= q.minute_start + interval '1 minute'
                            THEN nxt.now ELSE q.minute_start END,
        minute_requests = """ + REQUESTS_STORED.format("""
                          CASE WHEN nxt.now >= q.minute_start + interval '1 minute'
                               THEN 0 ELSE q.minute_requests END + $4::bigint""") + """,
        period_start = CASE WHEN nxt.period IS NOT NULL AND
                                 nxt.now >= q.period_start + make_interval(secs => nxt.period)
                            THEN nxt.now ELSE q.period_start END,
        period_tokens = """ + TOKENS_STORED.format("""
                        CASE WHEN nxt.period IS NOT NULL AND
                                  nxt.now >= q.period_start + make_interval(secs => nxt.period)
                             THEN 0 ELSE q.period_tokens END + $5""") + """
    FROM nxt
    WHERE q.tenant_id = nxt.tenant_id AND q.key_id = nxt.key_id
      AND (nxt.rpm IS NULL OR
           CASE WHEN nxt.now >= q.minute_start + interval '1 minute'
                THEN 0 ELSE q.minute_requests END + $4::bigint <= nxt.rpm)
      AND (nxt.token_quota IS NULL OR
           CASE WHEN nxt.period IS NOT NULL AND
                     nxt.now >= q.period_start + make_interval(secs => nxt.period)
                THEN 0 ELSE q.period_tokens END + $5 <= nxt.token_quota)
    RETURNING q.minute_start AS new_minute_start, q.minute_requests AS new_requests,
              q.period_start AS new_period_start, q.period_tokens AS new_tokens,
              nxt.rpm, nxt.token_quota, nxt.period, nxt.now
"""


# The start of every statement that charges a key: the time ($3, or the statement's),
# the key's counter row locked ($1, tenant $2 when given) with its limits, and whether
# its rate window and quota period are over. Callers continue with ", nxt AS (…)".
LOCKED_COUNTER_SQL = """
    WITH p AS (SELECT coalesce($3::timestamptz, statement_timestamp()) AS now),
    cur AS (
        SELECT q.tenant_id, q.key_id, k.requests_per_minute AS rpm, k.token_quota,
               k.quota_period_seconds AS period, p.now,
               q.minute_start, q.minute_requests, q.period_start, q.period_tokens
        FROM api_key_quotas q JOIN api_keys k USING (tenant_id, key_id), p
        WHERE q.key_id = $1 AND ($2::text IS NULL OR q.tenant_id = $2)
        FOR UPDATE OF q
    ),
    win AS (
        SELECT cur.*,
            (now >= minute_start + interval '1 minute') AS minute_over,
            (period IS NOT NULL AND now >= period_start + make_interval(secs => period))
                AS period_over
        FROM cur
    )"""

# One statement: lock the counter row (waiting for, then reading, a concurrent charge),
# roll expired windows over, and when the request fits count it, reserve
# min($4, remaining) tokens and record the reservation. The plan row comes back either
# way, so a refusal needs no second query to say why.
_RESERVE_SQL = LOCKED_COUNTER_SQL + f""",
    nxt AS (
        SELECT win.*,
            CASE WHEN minute_over THEN now ELSE minute_start END AS new_minute_start,
            CASE WHEN minute_over THEN 0 ELSE minute_requests::bigint END + 1 AS new_requests,
            CASE WHEN period_over THEN now ELSE period_start END AS new_period_start,
            CASE WHEN period_over THEN 0 ELSE period_tokens END AS used
        FROM win
    ),
    plan AS (
        SELECT nxt.*,
            CASE WHEN token_quota IS NULL THEN $4::bigint
                 ELSE least($4::bigint, greatest(token_quota - used, 0)) END AS reserved,
            (rpm IS NULL OR new_requests <= rpm) AS requests_fit,
            (token_quota IS NULL OR token_quota - used >= $5::bigint) AS tokens_fit
        FROM nxt
    ),
    upd AS (
        UPDATE api_key_quotas q SET
            minute_start = plan.new_minute_start,
            minute_requests = {REQUESTS_STORED.format("plan.new_requests")},
            period_start = plan.new_period_start,
            period_tokens = {TOKENS_STORED.format("plan.used + plan.reserved")}
        FROM plan
        WHERE q.tenant_id = plan.tenant_id AND q.key_id = plan.key_id
          AND plan.requests_fit AND plan.tokens_fit
        RETURNING q.key_id
    ),
    ins AS (
        INSERT INTO api_key_quota_reservations
            (tenant_id, key_id, reservation_id, period_start, tokens, created_at)
        SELECT plan.tenant_id, plan.key_id, $6, plan.new_period_start, plan.reserved, plan.now
        FROM plan JOIN upd USING (key_id)
    )
    SELECT plan.*, plan.used + CASE WHEN granted THEN plan.reserved ELSE 0 END AS new_tokens,
           granted
    FROM plan, (SELECT EXISTS (SELECT 1 FROM upd) AS granted) g
"""

# One statement: delete the reservation (a second settlement, or a concurrent one,
# finds nothing) and, while the counter is still in the reservation's period, swap
# its reserved tokens for the used ones.
_SETTLE_SQL = f"""
    WITH p AS (SELECT coalesce($4::timestamptz, statement_timestamp()) AS now),
    r AS (
        DELETE FROM api_key_quota_reservations r USING api_keys k
        WHERE k.key_id = $1 AND r.tenant_id = k.tenant_id AND r.key_id = k.key_id
          AND r.reservation_id = $2
        RETURNING r.tenant_id, r.key_id, r.period_start, r.tokens,
                  k.quota_period_seconds AS period
    ),
    q AS (
        UPDATE api_key_quotas q SET
            period_tokens = {TOKENS_STORED.format(
                "greatest(0, q.period_tokens - r.tokens + $3::bigint)")}
        FROM r, p
        WHERE q.tenant_id = r.tenant_id AND q.key_id = r.key_id
          AND q.period_start = r.period_start
          AND (r.period IS NULL OR p.now < r.period_start + make_interval(secs => r.period))
        RETURNING q.key_id
    )
    SELECT r.tokens, EXISTS (SELECT 1 FROM q) AS in_period FROM r
"""

_PURGE_SQL = "DELETE FROM api_key_quota_reservations WHERE created_at < $1"

_IN_FLIGHT_SQL = """
    SELECT coalesce(sum(tokens), 0) FROM api_key_quota_reservations
    WHERE tenant_id = $1 AND key_id = $2 AND period_start = $3
"""

IN_FLIGHT_RETRY_SECONDS = 1.0
"""Retry hint when the tokens a request needs are held by reservations of requests still
running: they settle (and release what they did not use) as they finish."""


@dataclass(frozen=True)
class QuotaStatus:
    tokens_used: int
    tokens_remaining: int | None
    requests_remaining: int | None
    requests_reset_in: float | None
    period_end: dt.datetime | None
    retry_after: float | None = None


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    tokens: int
    """Tokens reserved: the request's bound, capped to what remained."""
    limited: bool
    """The key has a token quota, so ``tokens`` bounds the generation."""
    status: QuotaStatus


@dataclass(frozen=True)
class Settlement:
    settled: bool
    """False when the reservation was already settled, purged or never existed."""
    released: int
    """Tokens given back to the reservation's period."""


class QuotaService:
    def __init__(self, pool: asyncpg.Pool, audit: AuditSink) -> None:
        self._pool = pool
        self._audit = audit

    async def check(
        self, key_id: str, tenant_id: str | None, *, tokens: int, is_request: bool,
        at: dt.datetime | None = None,
    ) -> tuple[bool, QuotaStatus]:
        """Would this charge fit now? Charges nothing."""
        row = await self._fetch(_CHECK_SQL, key_id, tenant_id, tokens, is_request, at)
        fits = bool(row["fits"])
        # Status of the window as it stands, without the prospective charge.
        status = quota_status(row, tokens, 1 if is_request else 0, charged=False)
        if not fits:
            status = _with_retry(status, row, tokens, is_request)
        return fits, status

    async def consume(
        self, key_id: str, tenant_id: str | None, *, tokens: int, is_request: bool,
        actor: str, at: dt.datetime | None = None,
    ) -> QuotaStatus:
        """Charge atomically, or raise RESOURCE_EXHAUSTED having charged nothing."""
        validate_charge(key_id, tokens)
        row = await self._pool.fetchrow(
            _CHARGE_SQL, key_id, tenant_id, at, 1 if is_request else 0, tokens
        )
        if row is not None:
            return quota_status(row, 0, 0, charged=True)
        fits, status = await self.check(key_id, tenant_id, tokens=tokens,
                                        is_request=is_request, at=at)
        if fits:  # the window rolled over between the two statements: try once more
            return await self.consume(key_id, tenant_id, tokens=tokens, is_request=is_request,
                                      actor=actor, at=at)
        await self._refuse(key_id, tenant_id, status, tokens, actor)
        raise AssertionError("unreachable")

    async def reserve(
        self, key_id: str, tenant_id: str | None, *, tokens: int, min_tokens: int,
        actor: str, at: dt.datetime | None = None,
    ) -> Reservation:
        """Count one request and reserve ``min(tokens, remaining)`` tokens, atomically.

        Refused, having charged nothing, with RESOURCE_EXHAUSTED when the request
        rate is spent, or INSUFFICIENT_QUOTA when fewer than ``min_tokens`` (at least
        one) tokens remain; both carry the time until the window resets.
        """
        validate_charge(key_id, tokens)
        if not 1 <= tokens <= MAX_TOKENS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"tokens must be between 1 and {MAX_TOKENS}", param="tokens")
        if not 0 <= min_tokens <= tokens:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "min_tokens must be between 0 and tokens", param="min_tokens")
        reservation_id = "rsv_" + secrets.token_hex(12)
        row = await self._pool.fetchrow(_RESERVE_SQL, key_id, tenant_id, at, tokens,
                                        max(min_tokens, 1), reservation_id)
        if row is None:
            raise FederationError(ErrorCode.NOT_FOUND, f"no API key {key_id}", param="key_id")
        # Refused: new_requests still holds the request that was not counted.
        status = quota_status(row, 0, 1, charged=bool(row["granted"]))
        if row["granted"]:
            return Reservation(reservation_id, int(row["reserved"]),
                               row["token_quota"] is not None, status)
        await self.refuse_reservation(key_id, row, status, tokens=tokens,
                                      min_tokens=max(min_tokens, 1), actor=actor)

    async def settle(
        self, key_id: str, reservation_id: str, *, used_tokens: int,
        at: dt.datetime | None = None,
    ) -> Settlement:
        """Charge what a reservation used; give the rest back to its own period only.

        Idempotent: a reservation already settled (or purged, or unknown) is left
        alone. ``used_tokens`` above the reservation is charged too (same period).
        """
        validate_charge(key_id, used_tokens, "used_tokens")
        storable(reservation_id, "reservation_id")
        row = await self._pool.fetchrow(_SETTLE_SQL, key_id, reservation_id, used_tokens, at)
        if row is None:
            return Settlement(False, 0)
        released = max(0, int(row["tokens"]) - used_tokens) if row["in_period"] else 0
        return Settlement(True, released)

    async def purge_unsettled(self, older_than: dt.timedelta) -> int:
        """Forget reservations nobody settled (their gateway died): they stay charged.

        Only a settlement could still change their charge, and none is coming this
        late; deleting the row leaves the counters alone.
        """
        now = await self._pool.fetchval("SELECT statement_timestamp()")
        result = await self._pool.execute(_PURGE_SQL, now - older_than)
        return int(result.split()[-1])

    async def refuse_reservation(self, key_id: str, row: asyncpg.Record, status: QuotaStatus,
                                 *, tokens: int, min_tokens: int, actor: str) -> NoReturn:
        """Refuse what a reserving statement (a reservation's or a lease's) did not grant,
        audited: the request rate first, else the token quota, spent for the period or,
        for now, held by requests in flight."""
        in_flight = 0
        if row["requests_fit"]:  # short of tokens: are they only held by running requests?
            in_flight = int(await self._pool.fetchval(
                _IN_FLIGHT_SQL, row["tenant_id"], row["key_id"], row["new_period_start"]))
        error = _reserve_refusal(key_id, row, status, min_tokens, in_flight)
        await self._refuse(key_id, row["tenant_id"],
                           replace(status, retry_after=error.retry_after_seconds), tokens,
                           actor, error)
        raise AssertionError("unreachable")

    async def _refuse(
        self, key_id: str, tenant_id: str | None, status: QuotaStatus, tokens: int, actor: str,
        error: FederationError | None = None,
    ) -> None:
        retry = status.retry_after or 0.0
        tenant = tenant_id or await self._pool.fetchval(
            "SELECT tenant_id FROM api_keys WHERE key_id = $1", key_id
        )
        try:
            await self._audit.record(AuditEntry(
                actor=actor, action="key.quota_exhausted", tenant_id=str(tenant or ""),
                subject=key_id, attributes={"tokens": str(tokens), "retry_after": f"{retry:.3f}"},
            ))
        except Exception as exc:
            raise FederationError(ErrorCode.UNAVAILABLE,
                                  "the audit log could not record key.quota_exhausted") from exc
        # A charge of no tokens (a vault call's) can only be refused for the request rate:
        # it says so, in the words of a generation's refusal.
        limit = "request rate limit reached" if tokens == 0 else "quota exceeded"
        raise error or FederationError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"{limit} for API key {key_id}; retry in {_wait_text(retry)}",
            retry_after_seconds=retry,
        )

    async def _fetch(
        self, sql: str, key_id: str, tenant_id: str | None, tokens: int, is_request: bool,
        at: dt.datetime | None,
    ) -> asyncpg.Record:
        validate_charge(key_id, tokens)
        row = await self._pool.fetchrow(sql, key_id, tenant_id, at, 1 if is_request else 0,
                                        tokens)
        if row is None:
            raise FederationError(ErrorCode.NOT_FOUND, f"no API key {key_id}", param="key_id")
        return row


def validate_charge(key_id: str, tokens: int, param: str = "tokens") -> None:
    """A known key id and a token figure the bigint counters can take: a uint64 past a
    bigint failed the statement (INTERNAL), and one charge of 2**63 - 1 left the counter
    where every later charge of the key overflowed."""
    keyformat.validate_key_id(key_id)
    if not 0 <= tokens <= MAX_TOKENS:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{param} must be between 0 and {MAX_TOKENS}", param=param)


def quota_status(row: asyncpg.Record, tokens: int, requests: int, *, charged: bool) -> QuotaStatus:
    """Usage from a row's new_* columns; for a check, minus the prospective charge."""
    used = int(row["new_tokens"]) - (0 if charged else tokens)
    made = int(row["new_requests"]) - (0 if charged else requests)
    now: dt.datetime = row["now"]
    period_end = (
        row["new_period_start"] + dt.timedelta(seconds=row["period"])
        if row["period"] is not None else None
    )
    reset_in = (row["new_minute_start"] + dt.timedelta(minutes=1) - now).total_seconds()
    return QuotaStatus(
        tokens_used=used,
        tokens_remaining=max(0, row["token_quota"] - used) if row["token_quota"] else None,
        requests_remaining=max(0, row["rpm"] - made) if row["rpm"] else None,
        requests_reset_in=reset_in if row["rpm"] else None,
        period_end=period_end,
    )


def _with_retry(
    status: QuotaStatus, row: asyncpg.Record, tokens: int, is_request: bool
) -> QuotaStatus:
    now: dt.datetime = row["now"]
    waits: list[float] = []
    if row["rpm"] is not None and is_request and row["new_requests"] > row["rpm"]:
        waits.append((row["new_minute_start"] + dt.timedelta(minutes=1) - now).total_seconds())
    if row["token_quota"] is not None and row["new_tokens"] > row["token_quota"]:
        assert status.period_end is not None
        waits.append((status.period_end - now).total_seconds())
    retry = max(waits) if waits else 0.0
    return QuotaStatus(status.tokens_used, status.tokens_remaining, status.requests_remaining,
                       status.requests_reset_in, status.period_end, max(retry, 0.0))


def _reserve_refusal(key_id: str, row: asyncpg.Record, status: QuotaStatus, min_tokens: int,
                     in_flight: int) -> FederationError:
    """Why a reservation was refused: the request rate first, else the token quota, which
    is either spent for the period or, for now, held by requests in flight."""
    now: dt.datetime = row["now"]
    if not row["requests_fit"]:
        wait = (row["new_minute_start"] + dt.timedelta(minutes=1) - now).total_seconds()
        return FederationError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"request rate limit reached for API key {key_id}; retry in {_wait_text(wait)}",
            retry_after_seconds=max(wait, 0.0),
        )
    assert status.period_end is not None  # only a key with a token quota runs short of tokens
    wait = max((status.period_end - now).total_seconds(), 0.0)
    remaining = status.tokens_remaining or 0
    if remaining + in_flight >= min_tokens:
        return FederationError(
            ErrorCode.INSUFFICIENT_QUOTA,
            f"API key {key_id} has {remaining} of {row['token_quota']} tokens free: "
            f"{in_flight} are reserved by requests in flight, which release what they do not "
            f"use when they end; this request needs at least {min_tokens}; retry in "
            f"{_wait_text(IN_FLIGHT_RETRY_SECONDS)}",
            retry_after_seconds=IN_FLIGHT_RETRY_SECONDS,
        )
    short = ("token quota exhausted for API key " + key_id if remaining == 0 else
             f"this request needs at least {min_tokens} tokens of API key {key_id}'s quota")
    return FederationError(
        ErrorCode.INSUFFICIENT_QUOTA,
        f"{short}: {remaining} of {row['token_quota']} tokens remain in this period, which "
        f"ends in {_wait_text(wait)}",
        retry_after_seconds=wait,
    )


def _wait_text(seconds: float) -> str:
    """A wait as people read it: ``0.4 s``, ``40 s``, ``15 min``, ``24.0 h``."""
    if seconds < 1:
        return f"{max(seconds, 0.0):.1f} s"
    if seconds < 120:
        return f"{max(seconds, 0.0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
