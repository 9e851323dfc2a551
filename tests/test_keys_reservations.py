"""Token reservations (reserve before a generation, settle after) against a real PostgreSQL.

The edges of the SQL one by one, then a property test that runs random sequences of
reservations, settlements and clock jumps against a plain Python model of the rules,
then concurrency over two connection pools (two gateway processes' worth).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.config import DatabaseConfig
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.keys.quota import QuotaService, Reservation
from federation.memory.store import MemoryStore, SearchQuery
from tests.keys_support import issue_key

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = 3600


@pytest.fixture
async def quotas(database: Database, store: MemoryStore) -> QuotaService:
    return QuotaService(database.pool, store)


async def reserved(quotas: QuotaService, key_id: str, tokens: int, min_tokens: int = 1,
                   at: dt.datetime = T0) -> Reservation:
    """A reservation the test expects to be granted."""
    reservation = await reserve(quotas, key_id, tokens, min_tokens, at)
    assert isinstance(reservation, Reservation), reservation
    return reservation


async def reserve(quotas: QuotaService, key_id: str, tokens: int, min_tokens: int = 1,
                  at: dt.datetime = T0) -> Reservation | FederationError:
    try:
        return await quotas.reserve(key_id, "acme", tokens=tokens, min_tokens=min_tokens,
                                    actor="gateway", at=at)
    except FederationError as exc:
        return exc


async def used(database: Database, key_id: str) -> tuple[int, int]:
    """(period tokens, requests this minute) as the counter row holds them."""
    row = await database.pool.fetchrow(
        "SELECT period_tokens, minute_requests FROM api_key_quotas WHERE key_id = $1", key_id)
    assert row is not None
    return int(row["period_tokens"]), int(row["minute_requests"])


# ---- the edges ---------------------------------------------------------------------------------

async def test_a_reservation_bigger_than_what_remains_is_capped(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=HOUR)
    first = await reserve(quotas, key_id, 4096, min_tokens=50)
    assert isinstance(first, Reservation) and first.limited
    assert (first.tokens, first.status.tokens_used, first.status.tokens_remaining) == (100, 100, 0)
    settled = await quotas.settle(key_id, first.reservation_id, used_tokens=81, at=T0)
    assert (settled.settled, settled.released) == (True, 19)
    # 19 remain: a request needing at least 20 is refused, one needing 19 gets them all.
    refused = await reserve(quotas, key_id, 4096, min_tokens=20)
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.INSUFFICIENT_QUOTA
    assert refused.message == (
        f"this request needs at least 20 tokens of API key {key_id}'s quota: 19 of 100 tokens "
        "remain in this period, which ends in 60 min")
    assert refused.retry_after_seconds == pytest.approx(HOUR)
    assert await used(database, key_id) == (81, 1)  # the refused request was not counted
    last = await reserve(quotas, key_id, 4096, min_tokens=19)
    assert isinstance(last, Reservation) and last.tokens == 19
    assert await used(database, key_id) == (100, 2)


async def test_an_exact_fit_then_zero_remaining(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=60)
    exact = await reserve(quotas, key_id, 100, min_tokens=100)
    assert isinstance(exact, Reservation) and exact.tokens == 100
    await quotas.settle(key_id, exact.reservation_id, used_tokens=100, at=T0)
    for min_tokens in (0, 1):  # at least one token is always required
        refused = await reserve(quotas, key_id, 10, min_tokens=min_tokens,
                                at=T0 + dt.timedelta(seconds=15))
        assert isinstance(refused, FederationError)
        assert refused.code is ErrorCode.INSUFFICIENT_QUOTA
        assert refused.message.startswith(f"token quota exhausted for API key {key_id}: 0 of")
        assert refused.retry_after_seconds == pytest.approx(45)
    assert await used(database, key_id) == (100, 1)
    audit = await store.search(SearchQuery(tenant_id="acme", action_prefix="key.quota"))
    assert [r.subject for r in audit.records] == [key_id, key_id]
    # The next period starts afresh.
    fresh = await reserve(quotas, key_id, 10, at=T0 + dt.timedelta(seconds=61))
    assert isinstance(fresh, Reservation) and fresh.status.tokens_used == 10


async def test_no_token_quota_reserves_everything_and_counts_usage(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store)
    reservation = await reserved(quotas, key_id, 10**12)
    assert (reservation.tokens, reservation.limited) == (10**12, False)
    assert reservation.status.tokens_remaining is None
    await quotas.settle(key_id, reservation.reservation_id, used_tokens=42, at=T0)
    assert await used(database, key_id) == (42, 1)


async def test_the_request_rate_is_checked_first_and_charges_nothing(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, requests_per_minute=2, token_quota=100,
                         quota_period_seconds=HOUR)
    for _ in range(2):
        assert isinstance(await reserve(quotas, key_id, 10), Reservation)
    refused = await reserve(quotas, key_id, 10, at=T0 + dt.timedelta(seconds=20))
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert refused.retry_after_seconds == pytest.approx(40)
    assert await used(database, key_id) == (20, 2)


@pytest.mark.parametrize(("tokens", "min_tokens", "param"), [
    (0, 0, "tokens"), (2**62 + 1, 1, "tokens"), (10, 11, "min_tokens"), (10, -1, "min_tokens"),
])
async def test_bad_arguments_are_refused(
    database: Database, quotas: QuotaService, store: MemoryStore, tokens: int,
    min_tokens: int, param: str,
) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=HOUR)
    refused = await reserve(quotas, key_id, tokens, min_tokens)
    assert isinstance(refused, FederationError)
    assert (refused.code, refused.param) == (ErrorCode.INVALID_ARGUMENT, param)
    missing = await reserve(quotas, "A" * 16, 10)
    assert isinstance(missing, FederationError) and missing.code is ErrorCode.NOT_FOUND


async def test_tokens_held_by_requests_in_flight_are_worth_a_short_retry(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    """Refused now, but not for the whole period: running requests release what they
    do not use when they settle."""
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=HOUR)
    running = await reserved(quotas, key_id, 90)
    refused = await reserve(quotas, key_id, 50, min_tokens=20)
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.INSUFFICIENT_QUOTA
    assert refused.retry_after_seconds == 1.0
    assert "90 are reserved by requests in flight" in refused.message
    await quotas.settle(key_id, running.reservation_id, used_tokens=30, at=T0)
    admitted = await reserve(quotas, key_id, 50, min_tokens=20)
    assert isinstance(admitted, Reservation) and admitted.tokens == 50
    # Nothing in flight can make room for more than the quota itself.
    await quotas.settle(key_id, admitted.reservation_id, used_tokens=50, at=T0)
    spent = await reserve(quotas, key_id, 50, min_tokens=21)
    assert isinstance(spent, FederationError) and spent.retry_after_seconds == pytest.approx(HOUR)


# ---- settlement ------------------------------------------------------------------------------

async def test_settling_twice_refunds_once(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=1000, quota_period_seconds=HOUR)
    reservation = await reserved(quotas, key_id, 300)
    results = await asyncio.gather(*(
        quotas.settle(key_id, reservation.reservation_id, used_tokens=100, at=T0)
        for _ in range(5)))
    assert sorted((r.settled, r.released) for r in results) == [(False, 0)] * 4 + [(True, 200)]
    again = await quotas.settle(key_id, reservation.reservation_id, used_tokens=0, at=T0)
    assert (again.settled, again.released) == (False, 0)
    assert await used(database, key_id) == (100, 1)
    # Another key's reservation id settles nothing here.
    other = await issue_key(database, store, token_quota=1000, quota_period_seconds=HOUR)
    theirs = await reserved(quotas, other, 300)
    assert not (await quotas.settle(key_id, theirs.reservation_id, used_tokens=0)).settled
    assert await used(database, other) == (300, 1)


async def test_a_settlement_never_refunds_into_a_later_period(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=60)
    old = await reserved(quotas, key_id, 100)
    # The period ended; nothing was charged since: settling changes nothing.
    late = await quotas.settle(key_id, old.reservation_id, used_tokens=0,
                               at=T0 + dt.timedelta(seconds=60))
    assert (late.settled, late.released) == (True, 0)
    assert await used(database, key_id) == (100, 1)
    # A reservation of the first period, settled once the second has begun.
    older = await reserve(quotas, key_id, 50, at=T0 + dt.timedelta(seconds=70))
    assert isinstance(older, Reservation) and older.status.tokens_used == 50
    newer = await reserve(quotas, key_id, 100, at=T0 + dt.timedelta(seconds=140))
    assert isinstance(newer, Reservation) and newer.tokens == 100
    settled = await quotas.settle(key_id, older.reservation_id, used_tokens=1,
                                  at=T0 + dt.timedelta(seconds=141))
    assert (settled.settled, settled.released) == (True, 0)
    assert (await used(database, key_id))[0] == 100  # the new period is untouched


async def test_usage_above_the_reservation_is_charged_to_its_period(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    """An upstream whose prompt estimate fell short: the real usage is what counts."""
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=HOUR)
    reservation = await reserved(quotas, key_id, 60)
    settled = await quotas.settle(key_id, reservation.reservation_id, used_tokens=70, at=T0)
    assert (settled.settled, settled.released) == (True, 0)
    assert (await used(database, key_id))[0] == 70


async def test_unsettled_reservations_stay_charged_and_are_purged(
    database: Database, quotas: QuotaService, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, token_quota=1000, quota_period_seconds=HOUR)
    stale = await reserve(quotas, key_id, 300, at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    recent = await reserve(quotas, key_id, 200, at=dt.datetime.now(dt.UTC))
    assert isinstance(stale, Reservation) and isinstance(recent, Reservation)
    assert await quotas.purge_unsettled(dt.timedelta(hours=1)) == 1
    assert not (await quotas.settle(key_id, stale.reservation_id, used_tokens=0)).settled
    assert (await quotas.settle(key_id, recent.reservation_id, used_tokens=0)).settled
    assert (await used(database, key_id))[0] == 300  # the crashed request's tokens


# ---- a property test of the rules ----------------------------------------------------------

QUOTA = 100
PERIOD = 60


@dataclass
class Model:
    """The rules in plain Python: what the counters must hold after each step."""

    now: dt.datetime = T0
    period_start: dt.datetime | None = None
    used: int = 0
    open: dict[str, tuple[dt.datetime, int]] = field(default_factory=dict)

    def roll(self) -> None:
        if self.period_start is None or self.now >= self.period_start + dt.timedelta(
                seconds=PERIOD):
            self.period_start, self.used = self.now, 0

    def reserve(self, tokens: int, min_tokens: int) -> int | None:
        remaining = QUOTA - self.used if self.period_start is not None and (
            self.now < self.period_start + dt.timedelta(seconds=PERIOD)) else QUOTA
        if remaining < max(min_tokens, 1):
            return None
        self.roll()
        granted = min(tokens, remaining)
        self.used += granted
        return granted

    def settle(self, reservation_id: str, used: int) -> None:
        start, tokens = self.open.pop(reservation_id)
        if start == self.period_start and self.now < start + dt.timedelta(seconds=PERIOD):
            self.used = max(0, self.used - tokens + used)


steps = st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 2 * QUOTA), st.integers(0, 2 * QUOTA)),
    st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 2 * QUOTA)),
    st.tuples(st.just("wait"), st.sampled_from([1, 30, PERIOD]), st.just(0)),
), max_size=25)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # a new key per example
@given(steps)
async def test_reservations_follow_the_rules(
    database: Database, quotas: QuotaService, store: MemoryStore,
    plan: list[tuple[str, int, int]],
) -> None:
    key_id = await issue_key(database, store, token_quota=QUOTA, quota_period_seconds=PERIOD)
    model = Model()
    for action, a, b in plan:
        if action == "wait":
            model.now += dt.timedelta(seconds=a)
        elif action == "reserve":
            expected = model.reserve(a, min(b, a))
            got = await reserve(quotas, key_id, a, min(b, a), at=model.now)
            if expected is None:
                assert isinstance(got, FederationError)
                assert got.code is ErrorCode.INSUFFICIENT_QUOTA
            else:
                assert isinstance(got, Reservation) and got.tokens == expected
                assert model.period_start is not None
                model.open[got.reservation_id] = (model.period_start, expected)
        elif model.open:
            reservation_id = sorted(model.open)[a % len(model.open)]
            tokens = model.open[reservation_id][1]
            spent = b % (tokens + 1)  # a node never uses more than its budget
            model.settle(reservation_id, spent)
            await quotas.settle(key_id, reservation_id, used_tokens=spent, at=model.now)
        if model.period_start is not None:
            assert (await used(database, key_id))[0] == model.used
            assert model.used <= QUOTA


# ---- concurrency across processes ------------------------------------------------------------

async def test_fifty_concurrent_generations_over_two_pools_never_exceed_the_quota(
    database: Database, store: MemoryStore, pg_url: str
) -> None:
    """Each "generation" reserves 60, uses 30 to 60, settles; two pools, one quota."""
    key_id = await issue_key(database, store, token_quota=1000, quota_period_seconds=HOUR)
    second = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=20))
    await second.start()
    served: list[int] = []
    in_flight = 0
    peak = 0

    async def generation(service: QuotaService, i: int) -> None:
        nonlocal in_flight, peak
        reservation = await reserve(service, key_id, 60, min_tokens=30)
        if isinstance(reservation, FederationError):
            assert reservation.code is ErrorCode.INSUFFICIENT_QUOTA
            return
        in_flight += reservation.tokens
        peak = max(peak, sum(served) + in_flight)
        await asyncio.sleep(0.01 * (i % 3))
        spent = min(reservation.tokens, 30 + i % 31)
        served.append(spent)
        in_flight -= reservation.tokens
        await service.settle(key_id, reservation.reservation_id, used_tokens=spent)

    try:
        gateways = [QuotaService(database.pool, store), QuotaService(second.pool, store)]
        await asyncio.gather(*(generation(gateways[i % 2], i) for i in range(50)))
    finally:
        await second.stop()
    assert served and sum(served) <= 1000 and peak <= 1000
    assert (await used(database, key_id))[0] == sum(served)
