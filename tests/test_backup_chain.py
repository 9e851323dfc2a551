"""The restore event in the audit chain (real PostgreSQL, a real CA): a gap is accepted only
when an admin-signed restore event declares exactly that gap; the guardian's checkpoints
of the lost records stop counting as a rewrite, and what was lost stays in the report."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.backup.restore import write_restore_event
from federation.config import MemoryConfig, Settings
from federation.db import Database
from federation.guardian.chain_checks import verify_with_checkpoints
from federation.guardian.checkpoints import CheckpointLog
from federation.memory.records import AuditEntry
from federation.memory.restore_event import RESTORE_ACTION, RestoreClaim, RestoreVerifier
from federation.memory.store import MemoryStore
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from nodes import memory as memory_node
from tests.nodes_support import RunningNode, running
from tests.support import TestPKI


@pytest.fixture
async def chain(database: Database, tmp_path: Path) -> AsyncIterator[tuple[MemoryStore, TestPKI]]:
    pki = TestPKI(tmp_path / "home")
    verifier = RestoreVerifier.of_home(pki.ca.paths.directory, pki.ca.trust_domain)
    store = MemoryStore(database.pool, MemoryConfig(), restore_verifier=verifier)
    await store.start()
    for number in range(3):
        await store.record(AuditEntry(actor="test", action="key.issue", subject=f"k{number}"))
    try:
        yield store, pki
    finally:
        await store.stop()


async def claim_after_head(store: MemoryStore, pki: TestPKI, lost_to: int,
                           role: str = "admin") -> RestoreClaim:
    head = await store.head_hash()
    assert head is not None
    return RestoreClaim(
        backup_id="bk_test", backup_time="2026-01-01T00:00:00Z", backup_sequence=head[0],
        backup_hash=head[1], lost_from=head[0] + 1, lost_to=lost_to,
        guardian_checkpoint_sequence=lost_to, guardian_checkpoint_hash=bytes(32),
        restored_by=pki.identity(role, "operator").identity.spiffe_id)


async def test_a_declared_gap_verifies_and_is_reported(
        chain: tuple[MemoryStore, TestPKI], database: Database, tmp_path: Path) -> None:
    store, pki = chain
    guardian = CheckpointLog(tmp_path / "checkpoints.jsonl", Ed25519PrivateKey.generate())
    await guardian.sign(2, await store.hash_at(2) or b"")
    await guardian.sign(6, bytes(range(32)))  # a record the restore loses
    claim = await claim_after_head(store, pki, lost_to=6)
    await write_restore_event(database.pool, claim, pki.identity("admin", "operator"))
    after = await store.record(AuditEntry(actor="test", action="key.issue"))
    assert after.sequence == 8  # numbering goes on after the lost records
    await guardian.sign(8, after.hash)  # the guardian signs above its last checkpoint

    report = await verify_with_checkpoints(store, guardian.newest_first(),
                                           guardian.keys)
    assert report.intact, report.problem
    assert report.records_checked == 5
    assert report.last_checkpoint_sequence == 8
    (restore,) = report.restores
    assert (restore.lost_from, restore.lost_to, restore.lost_count) == (4, 6, 3)
    assert restore.restored_by.endswith("/operator/admin")

    # Without the event the same chain is broken at the first lost record.
    plain = await MemoryStore(database.pool, MemoryConfig()).verify_chain()
    assert not plain.intact and plain.first_bad_sequence == 7


async def test_a_restore_event_not_signed_by_an_admin_is_refused(
        chain: tuple[MemoryStore, TestPKI], database: Database) -> None:
    store, pki = chain
    claim = await claim_after_head(store, pki, lost_to=9, role="gateway")
    await write_restore_event(database.pool, claim, pki.identity("gateway", "operator"))
    report = await store.verify_chain()
    assert not report.intact
    assert report.first_bad_sequence == 10
    assert "not an admin" in report.problem


async def test_a_restore_event_signed_by_another_ca_is_refused(
        chain: tuple[MemoryStore, TestPKI], database: Database, tmp_path: Path) -> None:
    store, _ = chain
    stranger = TestPKI(tmp_path / "elsewhere")
    claim = await claim_after_head(store, stranger, lost_to=5)
    await write_restore_event(database.pool, claim, stranger.identity("admin", "operator"))
    report = await store.verify_chain()
    assert not report.intact
    assert "not issued by this federation's CA" in report.problem


async def test_an_event_declaring_less_than_the_gap_is_refused(
        chain: tuple[MemoryStore, TestPKI], database: Database) -> None:
    store, pki = chain
    claim = await claim_after_head(store, pki, lost_to=6)
    await write_restore_event(database.pool, claim, pki.identity("admin", "operator"))
    # Someone deletes record 3 after the fact and keeps the event: the gap is 3..6 now,
    # the event declares 4..6.
    async with database.pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE memory_records DISABLE TRIGGER USER")
        await conn.execute("DELETE FROM memory_records WHERE sequence = 3")
        await conn.execute("ALTER TABLE memory_records ENABLE TRIGGER USER")
    report = await store.verify_chain()
    assert not report.intact
    assert report.first_bad_sequence == 3


async def test_an_altered_restore_event_is_refused(
        chain: tuple[MemoryStore, TestPKI], database: Database) -> None:
    store, pki = chain
    claim = await claim_after_head(store, pki, lost_to=5)
    await write_restore_event(database.pool, claim, pki.identity("admin", "operator"))
    async with database.pool.acquire() as conn, conn.transaction():
        # The database owner shrinks the declared loss and recomputes nothing else.
        await conn.execute("ALTER TABLE memory_records DISABLE TRIGGER USER")
        await conn.execute(
            "UPDATE memory_records SET attributes = attributes || "
            "'{\"lost_count\": \"1\", \"lost_to\": \"4\"}' WHERE sequence = 6")
        await conn.execute("ALTER TABLE memory_records ENABLE TRIGGER USER")
    report = await store.verify_chain()
    assert not report.intact
    assert report.first_bad_sequence == 6
    assert "restore event" in report.problem


async def test_no_node_can_write_a_restore_event_through_record_memory(
        database: Database, tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "nodes")
    memory = RunningNode(pki, "memory", Settings(), database, memory_node)
    async with running(memory):
        for role in ("keys", "admin"):
            async with pki.channel(memory.address, role) as channel:
                stub = mgrpc.ThermalMemoryServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.RecordMemory(mpb.RecordMemoryRequest(action=RESTORE_ACTION))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "reserved" in (refused.value.details() or "")
