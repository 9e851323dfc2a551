"""The gateway's side of quota leases: admit requests from a lease, settle leases in batches.

The key authority grants a gateway a lease of a key's budget (``federation.keys.leases``):
some requests of its rate limit and a block of its token quota, already charged. The
:class:`LeaseBook` admits the key's requests from the lease it holds, with no round trip:
a request draws its reservation (the bound of its prompt and completion) from the lease
and, when it ends, gives back what it did not use; what it used is added to the lease's
charge. A lease ends when it expires, when its requests are spent, or when a request
finds it too small (then a new one is asked for, one at a time per key), and once its
last request has ended it is settled in one ``SettleQuotaLease``, spooled to the
gateway's durable outbox first so that a settlement is never lost.

Sizing: a key's first lease asks for ``keys.lease_initial_requests``; each later one for
twice what the last served (requests, and the most tokens it held at once), within
``keys.lease_max_requests``. The key authority caps it to a fraction of what remains and
answers an exact lease (this request alone) when little remains.

What leases change: a revoked or suspended key is refused by verification as before
(leases are drawn only after it); a change to a key's limits reaches a gateway within
``keys.lease_seconds``; a gateway that dies leaves its lease charged in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from federation.config import KeysConfig
from federation.db.errors import log_job_failure
from federation.errors import FederationError
from federation.keys.client import (
    GrantedLease,
    KeyPrincipal,
    KeyReservation,
    KeyVerifier,
    QuotaLeaser,
)
from federation.periodic import cancel_and_wait

log = logging.getLogger(__name__)

SWEEP_SECONDS_MAX = 0.5
"""Longest between two looks for expired leases: an idle key's lease is settled at most
this long after it expired."""

MAX_LEASE_TOKENS = 2**62
"""Most tokens a lease asks for (the key authority's counters are PostgreSQL bigints)."""

_DEMAND_LIMIT = 10_000
"""Keys whose last lease's demand is remembered (beyond it, forgotten: a first lease)."""


@dataclass(frozen=True)
class LeaseUse:
    """A lease's settlement: what its requests used (the outbox payload)."""

    key_id: str
    lease_id: str
    used_tokens: int
    used_requests: int


class LeaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leases = Counter(
            "federation_gateway_quota_leases", "Quota leases by event: granted (shared), "
            "exact (one request: little of the key's budget remains), settled",
            ["event"], registry=registry)
        self.requests = Counter(
            "federation_gateway_quota_lease_requests",
            "Requests of quota leases: granted, drawn (admitted), returned unused",
            ["kind"], registry=registry)
        self.tokens = Counter(
            "federation_gateway_quota_lease_tokens",
            "Tokens of quota leases: granted, used, returned unused", ["kind"],
            registry=registry)


@dataclass
class _Lease:
    grant: GrantedLease
    expires_at: float
    """Monotonic time after which no request is admitted from it."""
    requests_left: int
    tokens_left: int
    draws: dict[str, int] = field(default_factory=dict)
    """Requests admitted and not ended: draw id → tokens drawn."""
    held: int = 0
    drawn: int = 0
    used_tokens: int = 0
    peak: int = 0
    """The most tokens used and held at once: the demand the next lease is sized to."""
    closed: bool = False
    settled: bool = False

    def fits(self, tokens: int, now: float) -> bool:
        return (not self.closed and now < self.expires_at and self.requests_left > 0
                and self.tokens_left >= tokens)

    def draw(self, tokens: int) -> KeyReservation:
        self.drawn += 1
        draw_id = f"{self.grant.lease_id}/{self.drawn}"
        self.requests_left -= 1
        self.tokens_left -= tokens
        self.draws[draw_id] = tokens
        self.held += tokens
        self.peak = max(self.peak, self.used_tokens + self.held)
        grant = self.grant
        return KeyReservation(grant.key_id, draw_id, tokens,
                              tokens if grant.limited else None, grant.period_end, leased=True)

    def end_draw(self, draw_id: str, used_tokens: int) -> bool:
        """Put back what a request did not use; False if it had ended already."""
        tokens = self.draws.pop(draw_id, None)
        if tokens is None:
            return False
        self.held -= tokens
        self.used_tokens += used_tokens
        self.tokens_left = max(0, self.tokens_left + tokens - used_tokens)
        return True

    @property
    def spent(self) -> bool:
        return self.requests_left == 0 and not self.draws

    def use(self) -> LeaseUse:
        # Draws still open at a settlement (only at shutdown) are charged in full.
        return LeaseUse(self.grant.key_id, self.grant.lease_id, self.used_tokens + self.held,
                        self.drawn)


class LeaseBook:
    """``start()`` runs the sweeper of expired leases; ``stop()`` settles every lease."""

    def __init__(self, leaser: QuotaLeaser, config: KeysConfig,
                 spool: Callable[[LeaseUse], Awaitable[None]], metrics: LeaseMetrics, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._leaser = leaser
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._clock = clock
        self._open: dict[str, _Lease] = {}
        """Per key, the lease new requests draw from."""
        self._leases: dict[str, _Lease] = {}
        """Every lease not settled yet, by id."""
        self._granting: dict[str, asyncio.Future[None]] = {}
        self._demand: dict[str, tuple[int, int]] = {}
        """Per key, the last settled lease's (requests served, most tokens held)."""
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="quota-lease-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        for lease in list(self._leases.values()):
            lease.closed = True
            await self._settle(lease, direct=False)
        self._open.clear()

    async def end_all(self) -> None:
        """End every lease now: each is settled (its unused budget given back) as soon as
        its running requests have ended; later requests ask for new leases."""
        for lease in list(self._open.values()):
            await self._close(lease)

    @property
    def held(self) -> int:
        """Leases not settled yet (granted, or ended with requests still running)."""
        return len(self._leases)

    async def _sweep_loop(self) -> None:
        interval = min(SWEEP_SECONDS_MAX, self._config.lease_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception as exc:  # keep sweeping; a lease not settled stays charged
                log_job_failure(log, "settling expired quota leases failed", exc)

    async def sweep(self) -> None:
        """End every lease that has expired (settled once its requests have ended)."""
        now = self._clock()
        for lease in [lease for lease in self._open.values() if now >= lease.expires_at]:
            await self._close(lease)

    # -- admission -----------------------------------------------------------------------------

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
        """Admit one request of ``key_id`` needing up to ``tokens``: from the key's lease
        when it has room, else from a new one (which may be exact: ``tokens`` capped to
        what remains, at least ``min_tokens``). Refusals are the key authority's."""
        lease = self._open.get(key_id)
        if lease is not None and lease.fits(tokens, self._clock()):
            return self._draw(lease, tokens)
        pending = self._granting.get(key_id)
        if pending is not None:  # one grant at a time per key: wait for it, then draw
            await asyncio.shield(pending)
            lease = self._open.get(key_id)
            if lease is not None and lease.fits(tokens, self._clock()):
                return self._draw(lease, tokens)
        return await self._grant(key_id, tokens, min_tokens)

    def _draw(self, lease: _Lease, tokens: int) -> KeyReservation:
        self._metrics.requests.labels("drawn").inc()
        return lease.draw(tokens)

    async def _grant(self, key_id: str, tokens: int, min_tokens: int) -> KeyReservation:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        owner = self._granting.setdefault(key_id, done) is done
        previous = self._open.get(key_id)
        if previous is not None:
            self._retire(previous)  # settled below, once this request has its lease
        requests, wanted_tokens = self._wanted(key_id, tokens)
        asked_at = self._clock()
        try:
            grant = await self._leaser.grant_lease(
                key_id, requests=requests, tokens=wanted_tokens, need_tokens=tokens,
                min_tokens=min_tokens)
        finally:
            if owner:
                del self._granting[key_id]
            done.set_result(None)
            if previous is not None:
                await self._close(previous)
        lease = _Lease(grant, asked_at + grant.valid_seconds, grant.requests, grant.tokens)
        self._leases[grant.lease_id] = lease
        exact = grant.requests == 1 and grant.tokens <= tokens
        self._metrics.leases.labels("exact" if exact else "granted").inc()
        self._metrics.requests.labels("granted").inc(grant.requests)
        self._metrics.tokens.labels("granted").inc(grant.tokens)
        replaced = self._open.get(key_id)
        self._open[key_id] = lease
        reservation = self._draw(lease, min(tokens, grant.tokens))
        if replaced is not None:  # a concurrent grant of the same key: keep the newest
            await self._close(replaced)
        return reservation

    def _wanted(self, key_id: str, tokens: int) -> tuple[int, int]:
        """(requests, tokens) to ask for: twice the last lease's demand, or a first lease."""
        config = self._config
        first = max(1, config.lease_initial_requests)
        served, peak = self._demand.get(key_id, (0, 0))
        requests = min(max(first, 2 * served), max(1, config.lease_max_requests))
        return requests, min(max(2 * peak, tokens * min(requests, first)), MAX_LEASE_TOKENS)

    # -- release and settlement ----------------------------------------------------------------

    async def release(self, reservation: KeyReservation, used_tokens: int, *,
                      direct: bool = False) -> None:
        """A request drawn from a lease ended having used ``used_tokens``: give the rest
        back to the lease, and settle the lease if this ends it. ``direct`` settles over
        the network at once (spooling only if that fails), so the tokens are free for the
        key's next request before this call returns. A second release does nothing."""
        lease = self._leases.get(reservation.reservation_id.partition("/")[0])
        if lease is None or not lease.end_draw(reservation.reservation_id, used_tokens):
            return
        if lease.spent and self._open.get(lease.grant.key_id) is lease:
            await self._close(lease, direct=direct)
        elif lease.closed and not lease.draws:
            await self._settle(lease, direct=direct)

    async def _close(self, lease: _Lease, *, direct: bool = False) -> None:
        """Admit no more requests from ``lease``; settle it once none is running."""
        self._retire(lease)
        if not lease.draws:
            await self._settle(lease, direct=direct)

    def _retire(self, lease: _Lease) -> None:
        if self._open.get(lease.grant.key_id) is lease:
            del self._open[lease.grant.key_id]
        if not lease.closed:
            lease.closed = True
            self._remember_demand(lease)  # the next lease is sized now, not when this settles

    async def _settle(self, lease: _Lease, *, direct: bool) -> None:
        if lease.settled:
            return
        lease.settled = True
        self._leases.pop(lease.grant.lease_id, None)
        use = lease.use()
        metrics = self._metrics
        metrics.leases.labels("settled").inc()
        metrics.requests.labels("returned").inc(max(0, lease.grant.requests - use.used_requests))
        metrics.tokens.labels("used").inc(use.used_tokens)
        metrics.tokens.labels("returned").inc(max(0, lease.grant.tokens - use.used_tokens))
        if direct:
            with contextlib.suppress(FederationError):
                await self._leaser.settle_lease(use.key_id, use.lease_id,
                                                used_tokens=use.used_tokens,
                                                used_requests=use.used_requests)
                return
        try:
            await self._spool(use)
        except FederationError as exc:  # it stays charged in full: over, never under
            log.error("a quota lease settlement could not be spooled; the lease stays charged",
                      extra={"key_id": use.key_id, "lease_id": use.lease_id,
                             "error": exc.message})

    def _remember_demand(self, lease: _Lease) -> None:
        if len(self._demand) >= _DEMAND_LIMIT:
            self._demand.clear()
        self._demand[lease.grant.key_id] = (lease.drawn, lease.peak)


class LeasingKeyVerifier:
    """A :class:`KeyVerifier` whose reservations come from quota leases: verification
    goes to ``inner``; a reservation drawn from a lease is settled into it."""

    def __init__(self, inner: KeyVerifier, book: LeaseBook) -> None:
        self._inner = inner
        self.book = book

    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        return await self._inner.verify(key, scope=scope, source=source)

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
        return await self.book.reserve(key_id, tokens=tokens, min_tokens=min_tokens)

    async def settle(self, reservation: KeyReservation, used_tokens: int) -> None:
        """Settle now (the tokens are free when this returns), as ``SettleQuota`` would."""
        if reservation.leased:
            await self.book.release(reservation, used_tokens, direct=True)
        else:
            await self._inner.settle(reservation, used_tokens)
