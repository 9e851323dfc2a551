"""The key authority against a real PostgreSQL and a real thermal memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from federation.config import KeysConfig, MemoryConfig
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.keys import keyformat
from federation.keys.authority import KeyAuthority
from federation.keys.decay import decay_once, strength_decay_job
from federation.keys.models import IssueRequest, KeyState, StrengthKind
from federation.keys.strength import SECONDS_PER_DAY
from federation.memory.store import MemoryStore, SearchQuery


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def authority(
    database: Database, store: MemoryStore, clock: Clock
) -> AsyncIterator[KeyAuthority]:
    keys = KeyAuthority(database.pool, KeysConfig(), store, clock=clock)
    yield keys
    await keys.stop()


async def issue(authority: KeyAuthority, tenant: str = "acme", **kw: object) -> tuple[str, str]:
    issued = await authority.issue(IssueRequest(tenant, ["chat"], **kw), actor="admin")  # type: ignore[arg-type]
    return issued.view.record.key_id, issued.secret


async def actions(store: MemoryStore, prefix: str = "key.") -> list[str]:
    page = await store.search(SearchQuery(tenant_id=None, action_prefix=prefix, page_size=1000))
    return [r.action for r in reversed(page.records)]


async def test_issue_verify_list_with_audit(authority: KeyAuthority, store: MemoryStore) -> None:
    key_id, secret = await issue(authority)
    view = await authority.verify(secret, "10.0.0.1:5000", "chat")
    assert (view.record.tenant_id, view.state, view.record.key_id) == ("acme", KeyState.ACTIVE,
                                                                       key_id)
    assert 0 < view.strength <= 1
    assert [v.record.key_id for v in (await authority.list_keys("acme")).items] == [key_id]
    assert (await authority.list_keys("other")).items == []
    assert await actions(store) == ["key.issue"]
    with pytest.raises(FederationError) as denied:
        await authority.verify(secret, "10.0.0.1:5000", "admin")
    assert denied.value.code is ErrorCode.PERMISSION_DENIED


async def test_wrong_secrets_suspend_the_key_for_that_source_only(
    authority: KeyAuthority, store: MemoryStore, database: Database, clock: Clock
) -> None:
    key_id, secret = await issue(authority)
    await authority.verify(secret, "B", "chat")
    await authority.flush()  # B is now a known source of verified uses
    wrong = f"fed_{key_id}_" + "x" * 43
    wrong += keyformat.checksum(wrong)
    codes = []
    for _ in range(200):
        with pytest.raises(FederationError) as refused:
            await authority.verify(wrong, "A", "chat")
        codes.append(refused.value.code)
    assert codes[0] is ErrorCode.UNAUTHENTICATED and codes[-1] is ErrorCode.PERMISSION_DENIED
    # Failures from a never-verified source count double: suspended within ~14 attempts.
    assert codes.index(ErrorCode.PERMISSION_DENIED) < 20

    with pytest.raises(FederationError, match="suspended for requests from this source"):
        await authority.verify(secret, "A", "chat")
    assert (await authority.verify(secret, "B", "chat")).state is KeyState.ACTIVE

    # Another process (no shared cache) sees the same from the database.
    other = KeyAuthority(database.pool, KeysConfig(), store, clock=clock)
    with pytest.raises(FederationError, match="this source"):
        await other.verify(secret, "A", "chat")
    assert (await other.verify(secret, "B", "chat")).record.key_id == key_id

    audited = await actions(store)
    assert audited.count("key.source_suspend") == 1
    assert audited.count("key.verify_failed") == 200
    history = await authority.history(key_id, "acme", page_size=1000)
    assert {s.kind for s in history.items} >= {StrengthKind.FAILED_ATTEMPT, StrengthKind.ISSUED}


async def test_revoke_is_final_and_idempotent(
    authority: KeyAuthority, store: MemoryStore
) -> None:
    key_id, secret = await issue(authority)
    await authority.verify(secret, "s", "chat")
    revoked = await authority.revoke(key_id, "acme", "admin", "leaked")
    assert revoked.state is KeyState.REVOKED
    assert (await authority.revoke(key_id, None, "admin")).state is KeyState.REVOKED
    with pytest.raises(FederationError, match="revoked"):
        await authority.verify(secret, "s", "chat")
    assert await actions(store) == ["key.issue", "key.revoke"]
    with pytest.raises(FederationError) as refused:
        await authority.rotate(key_id, None, "admin", 0)
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION


async def test_other_tenants_cannot_touch_a_key(authority: KeyAuthority) -> None:
    key_id, _ = await issue(authority, tenant="acme")
    for call in (authority.revoke(key_id, "evil", "x"), authority.get(key_id, "evil"),
                 authority.rotate(key_id, "evil", "x", 0), authority.history(key_id, "evil")):
        with pytest.raises(FederationError) as refused:
            await call
        assert refused.value.code is ErrorCode.NOT_FOUND


async def test_rotation_keeps_the_old_secret_for_the_grace_period(
    authority: KeyAuthority, clock: Clock
) -> None:
    key_id, old = await issue(authority)
    rotated = await authority.rotate(key_id, "acme", "admin", grace_seconds=3600)
    assert rotated.view.record.key_id == key_id and rotated.secret != old
    assert rotated.old_secret_expires_at is not None
    await authority.verify(old, "s", "chat")
    await authority.verify(rotated.secret, "s", "chat")
    clock.now += 3601
    with pytest.raises(FederationError) as refused:
        await authority.verify(old, "s", "chat")
    assert refused.value.code is ErrorCode.UNAUTHENTICATED
    await authority.verify(rotated.secret, "s", "chat")

    again = await authority.rotate(key_id, "acme", "admin", grace_seconds=0)
    with pytest.raises(FederationError):
        await authority.verify(rotated.secret, "s", "chat")
    await authority.verify(again.secret, "s", "chat")


async def test_idle_key_is_suspended_with_a_rotate_hint_and_rotation_revives_it(
    authority: KeyAuthority, store: MemoryStore, clock: Clock
) -> None:
    key_id, secret = await issue(authority)
    clock.now += 140 * SECONDS_PER_DAY
    with pytest.raises(FederationError, match=f"federation keys rotate {key_id}") as refused:
        await authority.verify(secret, "s", "chat")
    assert refused.value.code is ErrorCode.PERMISSION_DENIED
    assert (await authority.get(key_id, "acme")).state is KeyState.SUSPENDED
    assert "key.suspend" in await actions(store)
    rotated = await authority.rotate(key_id, "acme", "admin", 0)
    assert (await authority.verify(rotated.secret, "s", "chat")).state is KeyState.ACTIVE


async def test_verified_uses_are_flushed_in_batches(
    authority: KeyAuthority, database: Database
) -> None:
    key_id, secret = await issue(authority)
    await asyncio.gather(*(authority.verify(secret, f"s{i % 3}", "chat") for i in range(100)))
    assert await authority.flush() == 1
    row = await database.pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
    assert row["usage_value"] > 1 and row["last_used_at"] is not None
    verified = await database.pool.fetchval(
        "SELECT count(*) FROM api_key_sources WHERE key_id = $1 AND verified", key_id)
    assert verified == 3
    history = await authority.history(key_id, "acme")
    assert history.items[0].kind is StrengthKind.VERIFIED_USE
    assert history.items[0].strength > history.items[-1].strength  # use strengthens


async def test_audit_failure_leaves_no_state_change(
    database: Database, clock: Clock, authority: KeyAuthority
) -> None:
    key_id, _ = await issue(authority)
    broken = MemoryStore(database.pool, MemoryConfig())  # never started: refuses records
    failing = KeyAuthority(database.pool, KeysConfig(), broken, clock=clock)
    with pytest.raises(FederationError) as refused:
        await failing.issue(IssueRequest("acme", ["chat"]), actor="admin")
    assert refused.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(FederationError):
        await failing.revoke(key_id, "acme", "admin")
    with pytest.raises(FederationError):
        await failing.rotate(key_id, "acme", "admin", 0)
    rows = await database.pool.fetch("SELECT key_id, state FROM api_keys")
    assert [(r["key_id"], r["state"]) for r in rows] == [(key_id, "active")]


async def test_expired_and_unknown_keys_are_refused(
    authority: KeyAuthority, clock: Clock
) -> None:
    _, secret = await issue(authority, ttl_seconds=60)
    clock.now += 61
    with pytest.raises(FederationError, match="expired"):
        await authority.verify(secret, "s", "chat")
    _, unknown = keyformat.generate()
    with pytest.raises(FederationError, match="invalid API key"):
        await authority.verify(unknown, "s", "chat")


async def test_issue_validates_its_request(authority: KeyAuthority) -> None:
    for bad in (IssueRequest("", ["chat"]), IssueRequest("t", []), IssueRequest("t", ["root"]),
                IssueRequest("t", ["chat"], token_quota=10)):
        with pytest.raises(FederationError) as refused:
            await authority.issue(bad, actor="admin")
        assert refused.value.code is ErrorCode.INVALID_ARGUMENT


async def test_pheromone_decay_suspends_idle_keys_and_audits_it(
    authority: KeyAuthority, store: MemoryStore, database: Database, clock: Clock
) -> None:
    old_id, _ = await issue(authority)
    clock.now += 100 * SECONDS_PER_DAY
    young_id, young = await issue(authority)
    clock.now += 40 * SECONDS_PER_DAY
    report = await decay_once(authority, database.pool)
    assert (report.checked, report.suspended) == (2, [old_id])
    assert (await authority.get(old_id, "acme")).state is KeyState.SUSPENDED
    assert (await authority.verify(young, "s", "chat")).record.key_id == young_id
    suspensions = await store.search(SearchQuery(tenant_id="acme", action_prefix="key.suspend"))
    assert [(r.subject, r.actor) for r in suspensions.records] == [(old_id, "keys/decay")]
    history = await authority.history(young_id, "acme")
    assert history.items[0].kind is StrengthKind.DECAY

    job = strength_decay_job(authority, database.pool, interval=0.01)
    await job.start()
    await asyncio.sleep(0.2)
    await job.stop()
    samples = await database.pool.fetchval(
        "SELECT count(*) FROM api_key_strength_history WHERE key_id = $1 AND kind = 'decay'",
        young_id)
    assert samples >= 2
