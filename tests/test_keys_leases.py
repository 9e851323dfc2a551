"""Quota leases (the key authority's side) against a real PostgreSQL: what a lease is
granted, what its settlement gives back, when it is exact, and how long it is valid.

A lease is charged up front on the same counters a reservation uses; these tests read the
counter row itself after each step."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from federation.config import DatabaseConfig
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.keys.leases import Lease, LeaseRequest, LeaseService
from federation.keys.quota import QuotaService
from federation.memory.store import MemoryStore
from tests.keys_support import issue_key

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = 3600
MAX_SECONDS = 2.0


@pytest.fixture
async def leases(database: Database, store: MemoryStore) -> LeaseService:
    return LeaseService(database.pool, QuotaService(database.pool, store),
                        max_seconds=MAX_SECONDS, max_fraction=0.25)


async def grant(leases: LeaseService, key_id: str, *, requests: int = 8, tokens: int = 800,
                need: int = 100, min_tokens: int = 1, at: dt.datetime = T0
                ) -> Lease | FederationError:
    try:
        return await leases.grant(key_id, "acme", LeaseRequest(requests, tokens, need, min_tokens),
                                  actor="gateway", at=at)
    except FederationError as exc:
        return exc


async def granted(leases: LeaseService, key_id: str, **asked: int) -> Lease:
    lease = await grant(leases, key_id, **asked)  # type: ignore[arg-type]
    assert isinstance(lease, Lease), lease
    return lease


async def used(database: Database, key_id: str) -> tuple[int, int]:
    """(period tokens, requests this minute) as the counter row holds them."""
    row = await database.pool.fetchrow(
        "SELECT period_tokens, minute_requests FROM api_key_quotas WHERE key_id = $1", key_id)
    assert row is not None
    return int(row["period_tokens"]), int(row["minute_requests"])


async def test_a_lease_takes_at_most_a_quarter_of_what_remains_and_gives_back_the_rest(
    database: Database, leases: LeaseService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=1000, quota_period_seconds=HOUR,
                             requests_per_minute=100)
    lease = await granted(leases, key_id, requests=50, tokens=600, need=100)
    assert (lease.requests, lease.tokens, lease.limited) == (25, 250, True)
    assert lease.valid_seconds == MAX_SECONDS
    assert (lease.status.tokens_remaining, lease.status.requests_remaining) == (750, 75)
    assert await used(database, key_id) == (250, 25)  # charged up front
    # The next lease (another gateway's) finds three quarters of the rest.
    second = await granted(leases, key_id, requests=50, tokens=600, need=100)
    assert (second.requests, second.tokens) == (18, 187)
    # Settling charges what was used and gives back the rest: tokens and requests.
    settled = await leases.settle(key_id, lease.lease_id, used_tokens=120, used_requests=3,
                                  at=T0)
    assert (settled.settled, settled.released_tokens, settled.released_requests) == (
        True, 130, 22)
    assert await used(database, key_id) == (120 + 187, 3 + 18)
    again = await leases.settle(key_id, lease.lease_id, used_tokens=120, used_requests=3,
                                at=T0)
    assert not again.settled and await used(database, key_id) == (120 + 187, 3 + 18)


async def test_when_little_remains_the_lease_is_exact_and_refusals_are_a_reservations(
    database: Database, leases: LeaseService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=HOUR)
    first = await granted(leases, key_id, requests=8, tokens=800, need=81)
    assert (first.requests, first.tokens) == (1, 81)  # a quarter (25) cannot cover 81
    await leases.settle(key_id, first.lease_id, used_tokens=81, used_requests=1, at=T0)
    capped = await granted(leases, key_id, need=4096, min_tokens=2)
    assert (capped.requests, capped.tokens) == (1, 19)  # capped to what remains
    refused = await grant(leases, key_id, need=4096, min_tokens=2)
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.INSUFFICIENT_QUOTA
    assert refused.message == (  # the tokens are held by the lease, not spent
        f"API key {key_id} has 0 of 100 tokens free: 19 are reserved by requests in flight, "
        "which release what they do not use when they end; this request needs at least 2; "
        "retry in 1 s")
    await leases.settle(key_id, capped.lease_id, used_tokens=19, used_requests=1, at=T0)
    spent = await grant(leases, key_id, need=4096, min_tokens=2)
    assert isinstance(spent, FederationError)
    assert spent.message == (f"token quota exhausted for API key {key_id}: 0 of 100 tokens "
                             "remain in this period, which ends in 60 min")
    assert spent.retry_after_seconds == pytest.approx(HOUR)
    assert await used(database, key_id) == (100, 2)  # refusals charge nothing


async def test_the_rate_limit_holds_and_a_refusal_says_when_the_window_resets(
    database: Database, leases: LeaseService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, requests_per_minute=10)
    sizes = [(await granted(leases, key_id, requests=100)).requests for _ in range(7)]
    assert sizes == [2, 2, 1, 1, 1, 1, 1]  # a quarter of what remains, at least one
    assert sum(sizes) == 9
    last = await granted(leases, key_id, requests=100, tokens=10**9, need=10**6)
    assert (last.requests, last.tokens, last.limited) == (1, 10**9, False)  # no token quota
    refused = await grant(leases, key_id, at=T0 + dt.timedelta(seconds=15))
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert refused.retry_after_seconds == pytest.approx(45)
    assert await used(database, key_id) == (10**9 + 7 * 800, 10)


async def test_a_lease_never_outlives_the_window_it_was_charged_to(
    database: Database, leases: LeaseService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, requests_per_minute=1000, token_quota=10**6,
                             quota_period_seconds=90)
    await granted(leases, key_id)  # opens the rate window and the quota period at T0
    late = await granted(leases, key_id, at=T0 + dt.timedelta(seconds=59.5))
    assert late.valid_seconds == pytest.approx(0.5)
    # A new rate window at T0 + 60 s, but the quota period ends at T0 + 90 s.
    next_minute = await granted(leases, key_id, at=T0 + dt.timedelta(seconds=89))
    assert next_minute.valid_seconds == pytest.approx(1.0)
    unlimited = await issue_key(database, store)
    assert (await granted(leases, unlimited)).valid_seconds == MAX_SECONDS


async def test_a_late_settlement_gives_nothing_back_to_a_later_window(
    database: Database, leases: LeaseService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, requests_per_minute=100, token_quota=1000,
                             quota_period_seconds=120)
    lease = await granted(leases, key_id, requests=20, tokens=200, need=100)
    assert (lease.requests, lease.tokens) == (20, 200)
    # After the rate window rolled over: the tokens come back, the requests do not.
    settled = await leases.settle(key_id, lease.lease_id, used_tokens=50, used_requests=5,
                                  at=T0 + dt.timedelta(seconds=61))
    assert (settled.released_tokens, settled.released_requests) == (150, 0)
    other = await granted(leases, key_id, requests=4, tokens=100, need=100,
                          at=T0 + dt.timedelta(seconds=61))
    # After the quota period ended: nothing comes back to the new period.
    settled = await leases.settle(key_id, other.lease_id, used_tokens=0, used_requests=0,
                                  at=T0 + dt.timedelta(seconds=121))
    assert (settled.released_tokens, settled.released_requests) == (0, 0)


@pytest.mark.parametrize(("field", "value"), [("requests", 0), ("need", 0), ("min_tokens", 101)])
async def test_bad_lease_requests_are_refused_with_the_parameter_named(
    database: Database, leases: LeaseService, store: MemoryStore, field: str, value: int
) -> None:
    key_id = await issue_key(database, store)
    refused = await grant(leases, key_id, **{field: value})
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.INVALID_ARGUMENT
    assert refused.param == {"need": "need_tokens"}.get(field, field)


async def test_concurrent_leases_over_two_pools_never_exceed_the_quota_or_the_rate(
    database: Database, store: MemoryStore, pg_url: str
) -> None:
    """Two gateways' worth of grants and settlements racing on one key."""
    key_id = await issue_key(database, store, token_quota=5000, quota_period_seconds=HOUR,
                             requests_per_minute=60)
    second = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=20))
    await second.start()
    served_tokens: list[int] = []
    served_requests: list[int] = []

    async def gateway(service: LeaseService, i: int) -> None:
        lease = await grant(service, key_id, requests=4 + i % 5, tokens=400, need=100)
        if isinstance(lease, FederationError):
            assert lease.code in (ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.INSUFFICIENT_QUOTA)
            return
        requests = 1 + i % lease.requests
        tokens = min(lease.tokens, 40 * requests)
        served_requests.append(requests)
        served_tokens.append(tokens)
        await asyncio.sleep(0.01 * (i % 3))
        await service.settle(key_id, lease.lease_id, used_tokens=tokens,
                             used_requests=requests)

    try:
        quotas = [QuotaService(database.pool, store), QuotaService(second.pool, store)]
        services = [LeaseService(pool.pool, q, max_seconds=2.0, max_fraction=0.25)
                    for pool, q in zip((database, second), quotas, strict=True)]
        await asyncio.gather(*(gateway(services[i % 2], i) for i in range(60)))
    finally:
        await second.stop()
    assert sum(served_tokens) <= 5000 and sum(served_requests) <= 60
    assert await used(database, key_id) == (sum(served_tokens), sum(served_requests))
