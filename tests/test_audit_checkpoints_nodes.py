"""Audit checkpoints through the real nodes: the memory node asks the real guardian node
to sign its chain head, and ``federation audit verify`` (its handler, in process, over
mTLS as the operator) checks the chain against the signed checkpoints. A rewrite of the
whole chain by the database superuser is still caught, and so is a truncation."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from federation.cli import audit as audit_commands
from federation.config import GuardianConfig, PeersConfig, Settings
from federation.db import Database
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.guardian.checkpoints import public_key_path
from federation.pki import ADMIN_NAME
from federation.v1 import guardian_pb2, guardian_pb2_grpc
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from nodes import guardian as guardian_node
from nodes import memory as memory_node
from tests.nodes_support import RunningNode, running
from tests.support import TestPKI
from tests.test_guardian_checkpoints import _rewrite_chain_as_superuser

EVERY = 10


@dataclass
class Cluster:
    pki: TestPKI
    memory: RunningNode
    guardian: RunningNode
    settings: Settings
    """The operator's settings (home, peers) for the CLI handlers."""
    channels: dict[tuple[str, str], grpc.aio.Channel] = field(default_factory=dict)

    def _channel(self, address: str, role: str) -> grpc.aio.Channel:
        if (address, role) not in self.channels:
            self.channels[address, role] = self.pki.channel(address, role)
        return self.channels[address, role]

    def stub(self, role: str) -> mgrpc.ThermalMemoryServiceAsyncStub:
        return mgrpc.ThermalMemoryServiceStub(self._channel(self.memory.address, role))

    def guardian_stub(self) -> guardian_pb2_grpc.GuardianServiceAsyncStub:
        return guardian_pb2_grpc.GuardianServiceStub(
            self._channel(self.guardian.address, "admin"))


@pytest.fixture
async def cluster(tmp_path: Path, database: Database) -> AsyncIterator[Cluster]:
    pki = TestPKI(tmp_path / "home")
    pki.identity("admin", ADMIN_NAME)  # the operator identity the CLI uses
    memory = RunningNode(pki, "memory", Settings(), database, memory_node)
    guardian = RunningNode(pki, "guardian", Settings(), database, guardian_node)
    peers = PeersConfig(memory=memory.address, guardian=guardian.address)
    settings = Settings(home=pki.home, peers=peers, guardian=GuardianConfig(
        checkpoint_every_records=EVERY, checkpoint_every_seconds=3600))
    memory.settings = guardian.settings = settings
    async with running(guardian, memory):
        cluster = Cluster(pki, memory, guardian, settings)
        try:
            yield cluster
        finally:
            for channel in cluster.channels.values():
                await channel.close()


async def write_records(cluster: Cluster, count: int) -> None:
    """``count`` records, waiting for the checkpoint after every ``EVERY``-th, so that
    checkpoints fall exactly on multiples of ``EVERY``."""
    stub = cluster.stub("keys")
    guardian = cluster.guardian_stub()
    for n in range(1, count + 1):
        written = await stub.RecordMemory(mpb.RecordMemoryRequest(
            action="key.issue", tenant_id="t1", subject=f"k{n}",
            payload=mpb.AuditPayload(attributes={"n": str(n)})))
        if written.record.sequence % EVERY == 0:
            await wait_for_checkpoint(guardian, written.record.sequence)


async def wait_for_checkpoint(stub: guardian_pb2_grpc.GuardianServiceAsyncStub,
                              sequence: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                latest = await stub.GetCheckpoint(guardian_pb2.GetCheckpointRequest())
                if latest.checkpoint.sequence >= sequence:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
            await asyncio.sleep(0.02)


async def audit_verify(settings: Settings, *argv: str) -> tuple[int, str, str]:
    """``federation audit verify`` through its handler: exit code, stdout, stderr."""
    parser = argparse.ArgumentParser()
    audit_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = await args.handler(settings, args)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except grpc.aio.AioRpcError as exc:  # what ``federation.cli.main`` reports
            print(exc.details(), file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


async def test_a_full_rewrite_is_caught_by_audit_verify_through_the_nodes(
    cluster: Cluster, pg_url: str
) -> None:
    await write_records(cluster, 5 * EVERY)
    listed = await cluster.guardian_stub().ListCheckpoints(guardian_pb2.ListCheckpointsRequest())
    assert [c.sequence for c in listed.checkpoints] == [50, 40, 30, 20, 10]

    code, out, _ = await audit_verify(cluster.settings)
    assert code == 0
    assert ("intact: 50 records verified (last guardian checkpoint: record 50, signatures "
            "checked)") in out

    await _rewrite_chain_as_superuser(pg_url, edit_sequence=27)
    admin = cluster.stub("admin")
    report = await admin.VerifyChain(mpb.VerifyChainRequest())
    assert not report.intact
    assert report.first_bad_sequence == 21  # the first record after the last good checkpoint
    assert report.last_checkpoint_sequence == 50
    assert "first record after the last good checkpoint is 21" in report.problem

    code, out, err = await audit_verify(cluster.settings)
    assert code == 1 and out == ""
    assert "audit chain broken at record 21" in err
    assert "last guardian checkpoint: record 50" in err

    code, out, _ = await audit_verify(cluster.settings, "--json")
    assert code == 1 and '"first_bad_sequence": "21"' in out


async def test_verify_says_when_it_could_not_check_the_signatures(cluster: Cluster) -> None:
    # Without the guardian's .pub on the memory host, checkpoints are trusted as far as
    # mTLS goes: the answer was "intact" either way, with nothing to tell them apart.
    await write_records(cluster, 2 * EVERY)
    admin = cluster.stub("admin")
    assert (await admin.VerifyChain(mpb.VerifyChainRequest())).checkpoint_signatures_checked
    settings = cluster.settings
    public_key_path(settings.home / settings.guardian.signing_key_file).unlink()
    report = await admin.VerifyChain(mpb.VerifyChainRequest())
    assert report.intact and not report.checkpoint_signatures_checked
    code, out, _ = await audit_verify(settings)
    assert code == 0 and "signatures NOT checked" in out


async def test_records_deleted_from_the_end_are_caught(
    cluster: Cluster, pg_url: str
) -> None:
    await write_records(cluster, 3 * EVERY)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET session_replication_role = replica")  # triggers off
        await conn.execute("DELETE FROM memory_records WHERE sequence > 25")
    finally:
        await conn.close()
    code, _, err = await audit_verify(cluster.settings)
    assert code == 1
    assert "record 30, covered by a signed checkpoint, is missing" in err
    assert "broken at record 21" in err


async def test_appends_do_not_wait_for_a_stopped_guardian(cluster: Cluster) -> None:
    await cluster.guardian.stop()
    stub = cluster.stub("keys")
    async with asyncio.timeout(5):  # well under the guardian call timeout
        for n in range(2 * EVERY):
            await stub.RecordMemory(mpb.RecordMemoryRequest(action="key.issue", subject=str(n)))
    # Verification needs the checkpoints: with the guardian down it says so and fails.
    code, _, err = await audit_verify(cluster.settings)
    assert code != 0 and "guardian is unavailable" in err
    await cluster.guardian.start()
    async with asyncio.timeout(10):  # back: appends trigger the overdue checkpoint again
        while True:
            await stub.RecordMemory(mpb.RecordMemoryRequest(action="key.issue", subject="x"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await wait_for_checkpoint(cluster.guardian_stub(), 2 * EVERY + 1)
                    break
    code, out, _ = await audit_verify(cluster.settings)
    assert code == 0 and "last guardian checkpoint: record" in out


async def _refusal(call: object) -> FederationError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    return from_rpc_error(failed.value)


async def test_the_guardian_signs_only_what_the_chain_holds(
    cluster: Cluster, pg_url: str
) -> None:
    """A checkpoint request the chain does not hold (from an operator, or a confused
    memory node) was signed: one at 2**63 - 1 refused every later checkpoint and failed
    every verification for good (the log is append-only). Refused, naming the head."""
    await write_records(cluster, EVERY + 2)  # a checkpoint at 10; the head is 12
    admin = cluster.stub("admin")
    link = await admin.GetChainLink(mpb.GetChainLinkRequest(sequence=12))
    assert link.head_sequence == 12 and len(link.hash) == 32
    memory_role = guardian_pb2_grpc.GuardianServiceStub(
        cluster._channel(cluster.guardian.address, "memory"))
    for guardian in (cluster.guardian_stub(), memory_role):
        for sequence in (2**63 - 1, 13):
            refused = await _refusal(guardian.SignCheckpoint(guardian_pb2.SignCheckpointRequest(
                sequence=sequence, chain_head_hash=link.hash)))
            assert (refused.code, refused.param) == (ErrorCode.OUT_OF_RANGE, "sequence")
            assert f"sequence {sequence} is beyond the chain's head (record 12)" in \
                refused.message
        wrong = await _refusal(guardian.SignCheckpoint(guardian_pb2.SignCheckpointRequest(
            sequence=12, chain_head_hash=b"\x01" * 32)))
        assert (wrong.code, wrong.param) == (ErrorCode.FAILED_PRECONDITION, "chain_head_hash")
    listed = await cluster.guardian_stub().ListCheckpoints(guardian_pb2.ListCheckpointsRequest())
    assert [c.sequence for c in listed.checkpoints] == [10]
    signed = await memory_role.SignCheckpoint(guardian_pb2.SignCheckpointRequest(
        sequence=12, chain_head_hash=link.hash))
    assert signed.checkpoint.sequence == 12
    await write_records(cluster, EVERY - 2)  # the memory node's checkpoint at 20 follows
    code, out, _ = await audit_verify(cluster.settings)
    assert code == 0, out
    assert "intact: 20 records verified (last guardian checkpoint: record 20, signatures" in out
    beyond = await admin.GetChainLink(mpb.GetChainLinkRequest(sequence=2**63 - 1))
    assert (beyond.head_sequence, beyond.hash) == (20, b"")
    for sequence in (0, -1):
        below = await _refusal(admin.GetChainLink(mpb.GetChainLinkRequest(sequence=sequence)))
        assert (below.code, below.param) == (ErrorCode.INVALID_ARGUMENT, "sequence")
    # A record lost from the middle of the chain (as a restore's gap is) is not signed.
    lost = await admin.GetChainLink(mpb.GetChainLinkRequest(sequence=15))
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SET session_replication_role = replica")  # triggers off
        await conn.execute("DELETE FROM memory_records WHERE sequence = 15")
    finally:
        await conn.close()
    missing = await _refusal(memory_role.SignCheckpoint(guardian_pb2.SignCheckpointRequest(
        sequence=15, chain_head_hash=lost.hash)))
    assert (missing.code, missing.param) == (ErrorCode.FAILED_PRECONDITION, "sequence")
    assert "record 15 is not in the chain" in missing.message


async def test_no_checkpoint_is_signed_while_the_chain_cannot_be_read(cluster: Cluster) -> None:
    await write_records(cluster, 2)
    link = await cluster.stub("admin").GetChainLink(mpb.GetChainLinkRequest(sequence=2))
    await cluster.memory.stop()
    refused = await _refusal(cluster.guardian_stub().SignCheckpoint(
        guardian_pb2.SignCheckpointRequest(sequence=2, chain_head_hash=link.hash)))
    assert refused.code is ErrorCode.UNAVAILABLE
    assert "the memory node could not be asked for record 2" in refused.message
    await cluster.memory.start()
    async with asyncio.timeout(10):  # once the guardian's channel has reconnected
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                signed = await cluster.guardian_stub().SignCheckpoint(
                    guardian_pb2.SignCheckpointRequest(sequence=2, chain_head_hash=link.hash))
                break
            await asyncio.sleep(0.05)
    assert signed.checkpoint.sequence == 2
