"""Audit checkpoints: signed by the guardian, kept off the database, catching full rewrites."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import pytest

from federation.db import Database
from federation.errors import FederationError
from federation.guardian.checkpoints import (
    CheckpointLog,
    CheckpointScheduler,
    GuardianKeys,
    fingerprint,
    load_public_keys,
    verify_against_checkpoints,
)
from federation.memory import AuditEntry
from federation.memory.records import chain_hash
from federation.memory.store import MemoryStore, record_from_row
from federation.v1 import guardian_pb2, guardian_pb2_grpc
from tests.guardian_support import (
    GuardianNode,
    SwitchableSink,
    build_guardian,
    start_guardian,
)
from tests.support import TestPKI


@pytest.fixture
async def guardian(database: Database, home: Path, store: MemoryStore
                   ) -> AsyncIterator[GuardianNode]:
    custody, log = build_guardian(database, home, SwitchableSink(store))
    node = await start_guardian(TestPKI(home), custody, log)
    try:
        yield node
    finally:
        await node.server.stop(0)


def log_at(path: Path) -> CheckpointLog:
    return CheckpointLog.open(path / "checkpoints.jsonl", path / "signing.key")


async def test_checkpoints_are_signed_monotonic_and_persisted(tmp_path: Path) -> None:
    log = log_at(tmp_path)
    first = await log.sign(10, b"\x01" * 32)
    assert first.verify(log.keys)
    assert await log.sign(10, b"\x01" * 32) == first  # a retry is idempotent
    with pytest.raises(FederationError, match="rewritten"):
        await log.sign(10, b"\x02" * 32)
    with pytest.raises(FederationError, match="not after"):
        await log.sign(5, b"\x02" * 32)
    with pytest.raises(FederationError, match="32 bytes"):
        await log.sign(11, b"\x02")
    await log.sign(20, b"\x03" * 32)
    reloaded = log_at(tmp_path)
    assert [c.sequence for c in reloaded.newest_first()] == [20, 10]
    assert reloaded.get(0) == reloaded.get(20) and reloaded.get(15) is None
    assert (tmp_path / "checkpoints.jsonl").stat().st_mode & 0o777 == 0o600
    assert load_public_keys(tmp_path / "signing.key.pub").current is not None


async def test_a_signing_call_cancelled_mid_write_leaves_the_log_and_its_file_in_step(
    tmp_path: Path,
) -> None:
    # The memory node's SignCheckpoint call may be cancelled (its deadline) while the
    # guardian writes the line in a thread: the line reached the file but not the
    # in-memory log, so the retry signed the sequence again, a second line for it.
    log = log_at(tmp_path)
    signing = asyncio.create_task(log.sign(10, b"\x01" * 32))
    await asyncio.sleep(0)  # the write has started in a worker thread
    signing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await signing
    retried = await log.sign(10, b"\x01" * 32)  # the scheduler's next attempt
    lines = (tmp_path / "checkpoints.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert log.newest_first() == log_at(tmp_path).newest_first() == [retried]


async def test_a_lost_signing_key_is_replaced_and_old_checkpoints_still_verify(
    tmp_path: Path,
) -> None:
    # docs/guardian.md: losing the signing key means new checkpoints are signed by a new
    # key while old ones still verify. The guardian refused to start instead: every old
    # line failed "does not verify" against the new key.
    old = log_at(tmp_path)
    await old.sign(10, b"\x01" * 32)
    (tmp_path / "signing.key").unlink()
    new = log_at(tmp_path)  # a new key is made; the old one stays in the .pub file
    assert new.public_key != old.public_key
    signed_later = await new.sign(20, b"\x02" * 32)
    keys = load_public_keys(tmp_path / "signing.key.pub")
    assert list(keys.by_fingerprint) == [fingerprint(new.public_key),
                                         fingerprint(old.public_key)]
    assert all(c.verify(keys) for c in log_at(tmp_path).newest_first())
    assert signed_later.verify(keys) and not signed_later.verify(GuardianKeys.of(old.public_key))
    report = await verify_against_checkpoints(
        new.newest_first(), _hashes({10: b"\x01" * 32, 20: b"\x02" * 32}), keys)
    assert report.intact and report.checkpoints_checked == 2


async def test_a_checkpoint_of_an_unknown_key_stops_the_log_naming_it(tmp_path: Path) -> None:
    log = log_at(tmp_path)
    await log.sign(10, b"\x01" * 32)
    (tmp_path / "signing.key").unlink()
    (tmp_path / "signing.key.pub").unlink()  # and the verifiers' copy is gone too
    with pytest.raises(ValueError, match="neither the signing key nor one of the earlier"):
        log_at(tmp_path)


def _hashes(stored: dict[int, bytes]) -> Callable[[int], Awaitable[bytes | None]]:
    async def hash_at(sequence: int) -> bytes | None:
        return stored.get(sequence)
    return hash_at


async def test_a_line_torn_by_a_crash_is_cut_before_the_next_checkpoint(tmp_path: Path) -> None:
    # A crash mid-write leaves half a line with no newline; the next checkpoint was appended
    # to it, and at the start after that the bad line was no longer the last: refused.
    log = log_at(tmp_path)
    await log.sign(10, b"\x01" * 32)
    path = tmp_path / "checkpoints.jsonl"
    whole = path.read_text()
    path.write_text(whole + whole[:40])  # the torn half of a second line
    after_crash = log_at(tmp_path)
    await after_crash.sign(11, b"\x02" * 32)
    assert [c.sequence for c in log_at(tmp_path).newest_first()] == [11, 10]
    assert len(path.read_text().splitlines()) == 2


async def test_a_forged_checkpoint_in_the_file_is_refused(tmp_path: Path) -> None:
    log = log_at(tmp_path)
    await log.sign(10, b"\x01" * 32)
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(path.read_text().replace("01" * 32, "02" * 32))
    with pytest.raises(ValueError, match="does not verify"):
        log_at(tmp_path)


async def test_checkpoints_are_found_and_paged_by_sequence(tmp_path: Path) -> None:
    log = log_at(tmp_path)
    for sequence in range(3, 75, 3):  # 24 checkpoints: 3, 6, ..., 72
        await log.sign(sequence, sequence.to_bytes(32, "big"))
    assert log.get(33) is not None and log.get(33).sequence == 33  # type: ignore[union-attr]
    assert log.get(34) is None and log.get(1) is None and log.get(99) is None
    pages, below, more = [], None, True
    while more:
        page, more = log.newest_below(below, 10)
        pages.append([c.sequence for c in page])
        below = page[-1].sequence
    assert pages == [list(range(72, 42, -3)), list(range(42, 12, -3)), [12, 9, 6, 3]]
    assert log.newest_below(3, 10) == ([], False)
    assert [c.sequence for c in log.newest_below(10, 2)[0]] == [9, 6]


async def test_a_sequence_signed_twice_before_the_shield_is_loaded_once(tmp_path: Path) -> None:
    # A guardian before the shielded write could leave the same checkpoint twice in the
    # file (a cancelled call's retry); such a log must still load, each record once.
    log = log_at(tmp_path)
    await log.sign(10, b"\x01" * 32)
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(path.read_text() * 2)
    reloaded = log_at(tmp_path)
    assert [c.sequence for c in reloaded.newest_first()] == [10]
    await reloaded.sign(11, b"\x02" * 32)
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="not after checkpoint 11"):
        log_at(tmp_path)


async def test_only_the_memory_node_and_admins_request_checkpoints(guardian: GuardianNode) -> None:
    request = guardian_pb2.SignCheckpointRequest(sequence=1, chain_head_hash=b"\x00" * 32)
    for role in ("gateway", "edge", "inference"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await guardian_pb2_grpc.GuardianServiceStub(guardian.channel(role)).SignCheckpoint(
                request)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    memory = guardian_pb2_grpc.GuardianServiceStub(guardian.channel("memory"))
    signed = await memory.SignCheckpoint(request)
    assert signed.checkpoint.sequence == 1
    latest = await memory.GetCheckpoint(guardian_pb2.GetCheckpointRequest(sequence=0))
    assert latest.checkpoint == signed.checkpoint
    listed = await memory.ListCheckpoints(guardian_pb2.ListCheckpointsRequest())
    assert [c.sequence for c in listed.checkpoints] == [1]
    for sequence in (2, 3, 4):
        await memory.SignCheckpoint(guardian_pb2.SignCheckpointRequest(
            sequence=sequence, chain_head_hash=bytes([sequence]) * 32))
    pages, token = [], ""
    while True:
        page = await memory.ListCheckpoints(
            guardian_pb2.ListCheckpointsRequest(page_size=3, page_token=token))
        pages.append([c.sequence for c in page.checkpoints])
        token = page.next_page_token
        if not token:
            break
    assert pages == [[4, 3, 2], [1]]


async def _hash_at(pg_url: str, sequence: int) -> bytes | None:
    conn = await asyncpg.connect(pg_url)
    try:
        value = await conn.fetchval("SELECT hash FROM memory_records WHERE sequence = $1", sequence)
    finally:
        await conn.close()
    return bytes(value) if value is not None else None


async def _rewrite_chain_as_superuser(pg_url: str, edit_sequence: int) -> None:
    """Edit one record, then recompute every hash from there on, as the database owner can."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET session_replication_role = replica")  # triggers off
        await conn.execute(
            "UPDATE memory_records SET attributes = '{\"n\": \"forged\"}' WHERE sequence = $1",
            edit_sequence,
        )
        rows = await conn.fetch(
            "SELECT * FROM memory_records WHERE sequence >= $1 ORDER BY sequence", edit_sequence)
        prev = bytes(await conn.fetchval(
            "SELECT hash FROM memory_records WHERE sequence = $1", edit_sequence - 1))
        for row in rows:
            r = record_from_row(row)
            digest = chain_hash(
                prev, sequence=r.sequence, tenant_id=r.tenant_id, actor=r.actor,
                action=r.action, subject=r.subject, request_id=r.request_id,
                created_at=r.created_at, attributes=r.attributes, body=r.body)
            await conn.execute(
                "UPDATE memory_records SET prev_hash = $2, hash = $3 WHERE sequence = $1",
                r.sequence, prev, digest)
            prev = digest
    finally:
        await conn.close()


async def _wait_for_checkpoint(log: CheckpointLog, sequence: int) -> None:
    for _ in range(200):
        latest = log.get(0)
        if latest is not None and latest.sequence >= sequence:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no checkpoint at {sequence}")


async def test_a_full_rewrite_by_the_database_owner_is_still_detected(
    guardian: GuardianNode, store: MemoryStore, pg_url: str
) -> None:
    stub = guardian_pb2_grpc.GuardianServiceStub(guardian.channel("memory"))

    async def head() -> tuple[int, bytes] | None:
        sequence = await store.head()
        value = await _hash_at(pg_url, sequence) if sequence else None
        return (sequence, value) if value is not None else None

    async def sign(sequence: int, digest: bytes) -> object:
        return await stub.SignCheckpoint(
            guardian_pb2.SignCheckpointRequest(sequence=sequence, chain_head_hash=digest))

    scheduler = CheckpointScheduler(head, sign, every_records=10, every_seconds=3600)
    await scheduler.start()
    try:
        for batch in range(5):  # 50 records; a checkpoint after every 10
            records = await asyncio.gather(*(
                store.record(AuditEntry(actor="keys", action="key.issue", tenant_id="t1",
                                        subject=f"k{batch}-{i}", attributes={"n": str(i)}))
                for i in range(10)))
            scheduler.observe(max(r.sequence for r in records))
            await _wait_for_checkpoint(guardian.checkpoints, (batch + 1) * 10)
    finally:
        await scheduler.stop()
    assert [c.sequence for c in guardian.checkpoints.newest_first()] == [50, 40, 30, 20, 10]

    public_key = load_public_keys(guardian.pki.home / "guardian/checkpoint_signing.key.pub")

    async def hash_at(sequence: int) -> bytes | None:
        return await _hash_at(pg_url, sequence)

    before = await verify_against_checkpoints(
        guardian.checkpoints.newest_first(), hash_at, public_key)
    assert before.intact and before.checkpoints_checked == 5

    await _rewrite_chain_as_superuser(pg_url, edit_sequence=27)
    chain = await store.verify_chain()
    assert chain.intact  # the hash chain alone no longer notices...
    after = await verify_against_checkpoints(
        guardian.checkpoints.newest_first(), hash_at, public_key)
    assert not after.intact  # ...the guardian's checkpoints do,
    assert after.last_good_checkpoint == 20
    assert after.first_bad_sequence == 21  # naming the first record after the last good one
    assert "first record after the last good checkpoint is 21" in after.problem


async def test_a_truncated_chain_is_detected(tmp_path: Path) -> None:
    log = log_at(tmp_path)
    await log.sign(5, b"\x05" * 32)

    async def missing(sequence: int) -> bytes | None:
        return None

    report = await verify_against_checkpoints(log.newest_first(), missing, log.keys)
    assert not report.intact and report.first_bad_sequence == 1 and "missing" in report.problem
