"""The guardian over mTLS and real PostgreSQL: authorization, rate limit, audit, shredding."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from federation.config import GuardianConfig, PeersConfig, Settings
from federation.crypto.shares import new_key_id, split_key
from federation.db import Database
from federation.errors import RETRY_AFTER_METADATA
from federation.memory.store import MemoryStore, SearchQuery
from federation.v1 import guardian_pb2, guardian_pb2_grpc
from tests.guardian_support import (
    FakeClock,
    GuardianNode,
    SwitchableSink,
    build_guardian,
    start_guardian,
)
from tests.support import TestPKI


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def guardian(
    pki: TestPKI, database: Database, home: Path, sink: SwitchableSink, clock: FakeClock
) -> AsyncIterator[GuardianNode]:
    custody, log = build_guardian(database, home, sink, clock=clock)
    node = await start_guardian(pki, custody, log)
    try:
        yield node
    finally:
        await node.server.stop(0)


def stub(node: GuardianNode, role: str) -> guardian_pb2_grpc.GuardianServiceStub:
    return guardian_pb2_grpc.GuardianServiceStub(node.channel(role))


async def deposit(node: GuardianNode, tenant: str = "t1", obj: str = "o1") -> tuple[str, str]:
    key_id = new_key_id()
    share = split_key(os.urandom(32), key_id)[2]
    await stub(node, "gateway").DepositShare(guardian_pb2.DepositShareRequest(
        tenant_id=tenant, object_id=obj, key_id=key_id, share_index=3, share=share.encode()))
    return key_id, share.encode()


def release_request(tenant: str, obj: str, key_id: str, reason: str = "lost laptop",
                    by: str = "key_admin1") -> guardian_pb2.ReleaseShareRequest:
    return guardian_pb2.ReleaseShareRequest(
        tenant_id=tenant, object_id=obj, key_id=key_id, requested_by_key_id=by, reason=reason)


@pytest.mark.parametrize("role", ["edge", "inference", "memory", "keys", "council"])
async def test_only_gateway_or_admin_may_have_a_share_released(
    guardian: GuardianNode, role: str
) -> None:
    key_id, _ = await deposit(guardian)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(guardian, role).ReleaseShare(release_request("t1", "o1", key_id))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not call" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(guardian, role).ListShares(guardian_pb2.ListSharesRequest(tenant_id="t1"))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_gateway_and_admin_get_the_share_back(guardian: GuardianNode) -> None:
    key_id, text = await deposit(guardian)
    for role in ("gateway", "admin"):
        reply = await stub(guardian, role).ReleaseShare(release_request("t1", "o1", key_id))
        assert reply.share == text
    assert reply.record.release_count == 2 and reply.record.HasField("last_release_time")


async def test_release_needs_an_admin_key_id_and_a_reason(guardian: GuardianNode) -> None:
    key_id, _ = await deposit(guardian)
    for request in (release_request("t1", "o1", key_id, reason="  "),
                    release_request("t1", "o1", key_id, by="")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(guardian, "gateway").ReleaseShare(request)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_the_sixth_release_in_an_hour_is_refused_with_retry_after(
    guardian: GuardianNode, clock: FakeClock
) -> None:
    keys = [(await deposit(guardian, obj=f"o{i}"))[0] for i in range(3)]
    other_key, _ = await deposit(guardian, tenant="t2")
    gateway = stub(guardian, "gateway")
    for i in range(5):
        clock.advance(60)
        await gateway.ReleaseShare(release_request("t1", f"o{i % 3}", keys[i % 3]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.ReleaseShare(release_request("t1", "o0", keys[0]))
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 5" in (caught.value.details() or "")
    trailers = dict(caught.value.trailing_metadata() or ())
    # The oldest of the five was 4 minutes ago: it leaves the window in 56 minutes.
    assert int(trailers[RETRY_AFTER_METADATA]) == 56 * 60 * 1000
    # Per tenant: another tenant is not affected.
    await gateway.ReleaseShare(release_request("t2", "o1", other_key))
    clock.advance(56 * 60 + 1)
    await gateway.ReleaseShare(release_request("t1", "o0", keys[0]))


async def test_every_release_is_in_thermal_memory_with_who_and_why(
    guardian: GuardianNode, store: MemoryStore
) -> None:
    key_id, text = await deposit(guardian)
    await stub(guardian, "gateway").ReleaseShare(
        release_request("t1", "o1", key_id, reason="customer lost device", by="key_ops7"))
    page = await store.search(SearchQuery(tenant_id="t1", action_prefix="guardian.share.release"))
    [record] = page.records
    assert record.actor == "spiffe://federation.local/node/test/gateway"
    assert record.subject == "o1"
    assert record.attributes["reason"] == "customer lost device"
    assert record.attributes["requested_by_key_id"] == "key_ops7"
    assert record.attributes["key_id"] == key_id
    assert text not in repr(record) and text.encode() not in record.body


async def test_release_fails_closed_when_thermal_memory_cannot_record_it(
    guardian: GuardianNode, sink: SwitchableSink, database: Database
) -> None:
    key_id, _ = await deposit(guardian)
    sink.failing = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(guardian, "gateway").ReleaseShare(release_request("t1", "o1", key_id))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await database.pool.fetchval("SELECT count(*) FROM guardian.releases") == 0
    assert await database.pool.fetchval("SELECT release_count FROM guardian.shares") == 0
    # Deposits and destructions are state changes too: no audit, no change.
    with pytest.raises(grpc.aio.AioRpcError):
        await deposit(guardian, obj="o2")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub(guardian, "gateway").DestroyShare(guardian_pb2.DestroyShareRequest(
            tenant_id="t1", object_id="o1", key_id=key_id, reason="done"))
    assert await database.pool.fetchval("SELECT count(*) FROM guardian.shares") == 1
    assert await database.pool.fetchval("SELECT state FROM guardian.shares") == "held"


async def test_destroy_shreds_the_share_and_keeps_the_record(
    guardian: GuardianNode, database: Database
) -> None:
    key_id, _ = await deposit(guardian)
    gateway = stub(guardian, "gateway")
    request = guardian_pb2.DestroyShareRequest(
        tenant_id="t1", object_id="o1", key_id=key_id, reason="tenant offboarded")
    reply = await gateway.DestroyShare(request)
    assert reply.record.state == guardian_pb2.SHARE_STATE_DESTROYED
    assert (await gateway.DestroyShare(request)).record.state == guardian_pb2.SHARE_STATE_DESTROYED
    assert await database.pool.fetchval("SELECT wrapped FROM guardian.shares") is None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.ReleaseShare(release_request("t1", "o1", key_id))
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_deposit_checks_the_share_and_refuses_duplicates(guardian: GuardianNode) -> None:
    key_id, text = await deposit(guardian)
    typo = text[:-3] + ("aaa" if text[-3:] != "aaa" else "bbb")
    gateway = stub(guardian, "gateway")
    cases = [
        (guardian_pb2.DepositShareRequest(tenant_id="t1", object_id="o1", key_id=key_id,
                                          share_index=3, share=text),
         grpc.StatusCode.ALREADY_EXISTS),
        (guardian_pb2.DepositShareRequest(tenant_id="t1", object_id="o9", key_id=key_id,
                                          share_index=3, share=typo),
         grpc.StatusCode.INVALID_ARGUMENT),
        (guardian_pb2.DepositShareRequest(tenant_id="t1", object_id="o9", key_id=new_key_id(),
                                          share_index=3, share=text),
         grpc.StatusCode.INVALID_ARGUMENT),
        (guardian_pb2.DepositShareRequest(tenant_id="", object_id="o9", key_id=key_id,
                                          share_index=3, share=text),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway.DepositShare(request)
        assert caught.value.code() is code


async def test_list_gives_metadata_only_in_pages(guardian: GuardianNode) -> None:
    texts = [(await deposit(guardian, obj=f"o{i}"))[1] for i in range(5)]
    await deposit(guardian, tenant="t2")
    gateway = stub(guardian, "gateway")
    seen, token = [], ""
    while True:
        page = await gateway.ListShares(
            guardian_pb2.ListSharesRequest(tenant_id="t1", page_size=2, page_token=token))
        seen += [s.object_id for s in page.shares]
        assert all(t not in str(page) for t in texts)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"o{i}" for i in range(5)]


async def test_garbage_page_tokens_are_invalid_not_internal(guardian: GuardianNode) -> None:
    admin = stub(guardian, "admin")
    calls = [admin.ListShares(guardian_pb2.ListSharesRequest(
        tenant_id="t1", page_token=base64.urlsafe_b64encode(raw.encode()).decode()))
        for raw in ("s" + "9" * 19, "s" + "9" * 5000, "s\u00b2", "s", "x1")]
    calls += [admin.ListCheckpoints(guardian_pb2.ListCheckpointsRequest(page_token=token))
              for token in ("\u00b2", "9" * 19, "9" * 5000, "-1")]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert refused.value.details() == "page_token is not valid"


async def test_a_nul_in_any_text_field_is_invalid_not_internal(guardian: GuardianNode) -> None:
    key_id, text = await deposit(guardian)
    admin = stub(guardian, "admin")
    calls = {
        "tenant_id": admin.DepositShare(guardian_pb2.DepositShareRequest(
            tenant_id="t\x00", object_id="o2", key_id=key_id, share_index=3, share=text)),
        "object_id": admin.ReleaseShare(release_request("t1", "o\x001", key_id)),
        "reason": admin.ReleaseShare(release_request("t1", "o1", key_id, reason="r\x00")),
        "requested_by_key_id": admin.ReleaseShare(release_request("t1", "o1", key_id,
                                                                  by="k\x00")),
        "key_id": admin.DestroyShare(guardian_pb2.DestroyShareRequest(
            tenant_id="t1", object_id="o1", key_id=key_id + "\x00", reason="r")),
    }
    await refused_naming_each(calls)
    await only_share_still_held(admin)


async def test_the_share_is_stored_wrapped_never_in_the_clear(
    guardian: GuardianNode, database: Database
) -> None:
    _, text = await deposit(guardian)
    wrapped = bytes(await database.pool.fetchval("SELECT wrapped FROM guardian.shares"))
    assert text.encode() not in wrapped and text[9:].encode() not in wrapped


async def test_the_gateway_database_role_cannot_read_guardian_tables(
    guardian: GuardianNode, pg_url: str
) -> None:
    await deposit(guardian)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET ROLE federation_gateway")
        for table in ("guardian.shares", "guardian.releases"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM {table}")
        # ... while the vault table the gateway needs is readable by it.
        await conn.fetch("SELECT id FROM vault_secrets")
        await conn.execute("RESET ROLE")
        await conn.execute("SET ROLE federation_guardian")
        assert await conn.fetchval("SELECT count(*) FROM guardian.shares") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM vault_secrets")
    finally:
        await conn.close()


async def test_create_service_makes_private_key_files(database: Database, home: Path) -> None:
    import contextlib

    from prometheus_client import CollectorRegistry

    from nodes import guardian as guardian_node
    from nodes.runtime import NodeRuntime

    settings = Settings(home=home, peers=PeersConfig(memory="127.0.0.1:1"))
    async with contextlib.AsyncExitStack() as stack:
        runtime = NodeRuntime(settings, "guardian", None, database, CollectorRegistry(), stack)
        registration = await guardian_node.create_service(runtime)
    assert registration.full_name == "federation.v1.GuardianService"
    config = GuardianConfig()
    for name in (config.wrapping_key_file, config.signing_key_file):
        assert (home / name).stat().st_mode & 0o777 == 0o600
    assert (home / (config.signing_key_file + ".pub")).read_bytes().startswith(b"-----BEGIN")


async def test_ids_with_surrounding_spaces_are_refused_not_rewritten(
        guardian: GuardianNode) -> None:
    """A share is found by exactly the ids it was deposited under: " t1" is not "t1"
    (a key for " t1" could never be issued: ``checked_tenant_id`` refuses it)."""
    key_id, _ = await deposit(guardian)
    admin = stub(guardian, "admin")
    calls = {
        "tenant_id": admin.ReleaseShare(release_request(" t1", "o1", key_id)),
        "object_id": admin.ReleaseShare(release_request("t1", "o1 ", key_id)),
        "key_id": admin.DestroyShare(guardian_pb2.DestroyShareRequest(
            tenant_id="t1", object_id="o1", key_id=f" {key_id}", reason="r")),
        "requested_by_key_id": admin.ReleaseShare(release_request("t1", "o1", key_id,
                                                                  by="k1 ")),
    }
    await refused_naming_each(calls)
    await only_share_still_held(admin)


async def refused_naming_each(calls: dict[str, Any]) -> None:
    """Each call (started already) fails INVALID_ARGUMENT naming its key's field."""
    for param, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert dict(refused.value.trailing_metadata() or ())["error-param"] == param


async def only_share_still_held(admin: Any) -> None:
    """Tenant t1's one share is held and was never released."""
    listed = await admin.ListShares(guardian_pb2.ListSharesRequest(tenant_id="t1"))
    assert [(s.release_count, s.state) for s in listed.shares] == [
        (0, guardian_pb2.SHARE_STATE_HELD)]
