"""Quotas against a real PostgreSQL: atomic under concurrency, across processes."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from federation.config import DatabaseConfig
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.keys.quota import QuotaService, QuotaStatus
from federation.memory.store import MemoryStore, SearchQuery
from tests.keys_support import issue_key

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


async def attempt(quotas: QuotaService, key_id: str, tokens: int, at: dt.datetime,
                  is_request: bool = False) -> QuotaStatus | FederationError:
    try:
        return await quotas.consume(key_id, "acme", tokens=tokens, is_request=is_request,
                                    actor="gateway", at=at)
    except FederationError as exc:
        return exc


async def test_fifty_concurrent_consumers_never_exceed_the_quota(
    database: Database, store: MemoryStore, pg_url: str
) -> None:
    key_id = await issue_key(database, store, token_quota=1000, quota_period_seconds=3600)
    second = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=20))
    await second.start()
    try:
        gateways = [QuotaService(database.pool, store), QuotaService(second.pool, store)]
        results = await asyncio.gather(*(
            attempt(gateways[i % 2], key_id, 30, T0) for i in range(50)
        ))
    finally:
        await second.stop()
    granted = [r for r in results if isinstance(r, QuotaStatus)]
    refused = [r for r in results if isinstance(r, FederationError)]
    assert len(granted) == 1000 // 30 and len(refused) == 50 - 1000 // 30
    assert max(r.tokens_used for r in granted) == 990
    assert all(r.code is ErrorCode.RESOURCE_EXHAUSTED for r in refused)
    assert all(r.retry_after_seconds is not None and 3599 <= r.retry_after_seconds <= 3600
               for r in refused)
    used = await database.pool.fetchval(
        "SELECT period_tokens FROM api_key_quotas WHERE key_id = $1", key_id)
    assert used == 990
    audit = await store.search(SearchQuery(tenant_id="acme", action_prefix="key.quota"))
    assert len(audit.records) == len(refused)


async def test_requests_per_minute_with_time_until_reset(
    database: Database, store: MemoryStore
) -> None:
    key_id = await issue_key(database, store, requests_per_minute=5)
    quotas = QuotaService(database.pool, store)
    results = await asyncio.gather(*(attempt(quotas, key_id, 0, T0, True) for _ in range(50)))
    assert sum(isinstance(r, QuotaStatus) for r in results) == 5
    later = T0 + dt.timedelta(seconds=20)
    refused = await attempt(quotas, key_id, 0, later, True)
    assert isinstance(refused, FederationError)
    assert refused.retry_after_seconds == pytest.approx(40)
    allowed, status = await quotas.check(key_id, "acme", tokens=0, is_request=True,
                                         at=T0 + dt.timedelta(seconds=61))
    assert allowed and status.requests_remaining == 5
    after_reset = await attempt(quotas, key_id, 0, T0 + dt.timedelta(seconds=61), True)
    assert isinstance(after_reset, QuotaStatus) and after_reset.requests_remaining == 4


async def test_a_refused_charge_charges_nothing(database: Database, store: MemoryStore) -> None:
    key_id = await issue_key(database, store, token_quota=100, quota_period_seconds=60,
                         requests_per_minute=10)
    quotas = QuotaService(database.pool, store)
    assert isinstance(await attempt(quotas, key_id, 60, T0, True), QuotaStatus)
    assert isinstance(await attempt(quotas, key_id, 60, T0, True), FederationError)
    status = await attempt(quotas, key_id, 40, T0, True)
    assert isinstance(status, QuotaStatus)
    assert (status.tokens_used, status.tokens_remaining, status.requests_remaining) == (100, 0, 8)


async def test_unlimited_keys_and_unknown_keys(database: Database, store: MemoryStore) -> None:
    key_id = await issue_key(database, store)
    quotas = QuotaService(database.pool, store)
    status = await attempt(quotas, key_id, 10**9, T0, True)
    assert isinstance(status, QuotaStatus) and status.tokens_remaining is None
    with pytest.raises(FederationError) as missing:
        await quotas.consume("A" * 16, "acme", tokens=1, is_request=True, actor="g")
    assert missing.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(FederationError) as other_tenant:
        await quotas.consume(key_id, "evil", tokens=1, is_request=True, actor="g")
    assert other_tenant.value.code is ErrorCode.NOT_FOUND
