"""A database outage seen from the nodes: UNAVAILABLE with a retry hint, NOT_SERVING on
gRPC health, and recovery by itself when PostgreSQL returns.

Real processes: a PostgreSQL cluster of the test's own (it gets killed and stopped),
and the memory and key authority nodes started as ``federation node`` starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.errors import RETRY_AFTER_METADATA
from federation.pki import ADMIN_NAME, CertificateAuthority, ensure_identity
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import key_authority_pb2_grpc as kgrpc
from tests.db_support import OwnCluster, own_cluster
from tests.nodes_support import free_port
from tests.support import TestPKI

# Small bounds so that the test sees each outage answered quickly.
TIMEOUTS = {
    "FEDERATION_DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
    "FEDERATION_DATABASE_ACQUIRE_TIMEOUT_SECONDS": "1.5",
    "FEDERATION_DATABASE_COMMAND_TIMEOUT_SECONDS": "2",
    "FEDERATION_DATABASE_PROBE_INTERVAL_SECONDS": "0.5",
    "FEDERATION_DATABASE_PROBE_TIMEOUT_SECONDS": "1",
}
ANSWER_WITHIN = 6.0
"""Seconds a caller may wait for an answer during an outage: the bounds above plus slack
for a loaded 2-core machine."""
KEYS_SERVICE = "federation.v1.KeyAuthorityService"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    with own_cluster(tmp_path / "pg" / "data") as running:
        yield running


@dataclass
class Node:
    role: str
    process: asyncio.subprocess.Process
    address: str


@contextlib.asynccontextmanager
async def node_process(home: Path, role: str, env: dict[str, str]) -> AsyncIterator[Node]:
    ready = home / "run" / f"{role}.json"
    port = int(env[f"FEDERATION_PEERS_{role.upper()}"].rsplit(":", 1)[1])
    log = (home / f"{role}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "--home", str(home), "node", "--role", role,
        "--listen", f"127.0.0.1:{port}", "--metrics-port", "0", "--ready-file", str(ready),
        env=env, stdout=log, stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.returncode is None, (home / f"{role}.log").read_text()
            assert time.monotonic() < deadline, f"the {role} node did not start"
            await asyncio.sleep(0.1)
        yield Node(role, process, f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def health(channel: grpc.aio.Channel, service: str = KEYS_SERVICE) -> int:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.aio.AioRpcError:
        return -1
    return int(reply.status)


async def wait_for_health(channel: grpc.aio.Channel, status: int, within: float,
                          service: str = KEYS_SERVICE) -> float:
    started = time.monotonic()
    while await health(channel, service) != status:
        assert time.monotonic() - started < within, f"health did not become {status}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def issue(stub: kgrpc.KeyAuthorityServiceAsyncStub) -> grpc.aio.AioRpcError | None:
    """Issue a key; the call's error, or ``None`` when it succeeded."""
    try:
        await stub.IssueKey(kpb.IssueKeyRequest(tenant_id="acme", scopes=["chat"]), timeout=20)
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


def assert_unavailable(error: grpc.aio.AioRpcError | None) -> None:
    assert error is not None, "the call succeeded while the database was down"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert "database" in (error.details() or "")
    trailers = dict(error.trailing_metadata() or ())
    assert RETRY_AFTER_METADATA in trailers, trailers


@contextlib.asynccontextmanager
async def key_authority(tmp_path: Path, cluster: OwnCluster
                        ) -> AsyncIterator[tuple[kgrpc.KeyAuthorityServiceAsyncStub,
                                                 list[grpc.aio.Channel], list[Node]]]:
    """The memory and key authority nodes as processes; the key authority's stub, admin
    channels to (memory, keys) and the nodes."""
    home = tmp_path / "home"
    pki = TestPKI(home)
    ca: CertificateAuthority = pki.ca
    for role in ("keys", "memory"):
        ensure_identity(ca, role, "local")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= TIMEOUTS | {
        "FEDERATION_DATABASE_URL": cluster.url,
        "FEDERATION_PEERS_KEYS": f"127.0.0.1:{free_port()}",
        "FEDERATION_PEERS_MEMORY": f"127.0.0.1:{free_port()}",
    }
    async with node_process(home, "memory", env) as memory, \
            node_process(home, "keys", env) as keys:
        channels = [pki.channel(node.address, "admin", ADMIN_NAME) for node in (memory, keys)]
        try:
            yield kgrpc.KeyAuthorityServiceStub(channels[-1]), channels, [memory, keys]
        finally:
            for channel in channels:
                await channel.close()


async def wait_until_serving(channels: list[grpc.aio.Channel]) -> None:
    """Every node serving again: the key authority audits through thermal memory, so a
    key can be issued only once both have their database back."""
    for channel in channels:  # "": the node as a whole
        await wait_for_health(channel, health_pb2.HealthCheckResponse.SERVING, 15, service="")


async def test_killed_database_is_unavailable_then_recovers(tmp_path: Path,
                                                            cluster: OwnCluster) -> None:
    async with key_authority(tmp_path, cluster) as (stub, channels, nodes):
        channel = channels[-1]
        assert await issue(stub) is None
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING

        cluster.kill()
        started = time.monotonic()
        assert_unavailable(await issue(stub))
        assert time.monotonic() - started < ANSWER_WITHIN
        await wait_for_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING, ANSWER_WITHIN)

        cluster.restart()  # same port, same data
        await wait_until_serving(channels)
        assert await issue(stub) is None
        assert all(node.process.returncode is None for node in nodes), "a node restarted"


async def test_stalled_database_is_unavailable_then_recovers(tmp_path: Path,
                                                             cluster: OwnCluster) -> None:
    async with key_authority(tmp_path, cluster) as (stub, channels, nodes):
        channel = channels[-1]
        assert await issue(stub) is None
        stalled = cluster.stall()
        try:
            started = time.monotonic()
            assert_unavailable(await issue(stub))
            assert time.monotonic() - started < ANSWER_WITHIN
            await wait_for_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING,
                                  ANSWER_WITHIN)
            assert_unavailable(await issue(stub))  # still a clean 503, never INTERNAL
        finally:
            cluster.resume(stalled)
        await wait_until_serving(channels)
        assert await issue(stub) is None
        assert all(node.process.returncode is None for node in nodes), "a node restarted"



async def test_a_node_stopped_while_the_database_is_stalled_stops_cleanly(
        tmp_path: Path, cluster: OwnCluster) -> None:
    # Closing its pool waited for a stalled server to hang up each session, for the whole
    # command timeout, then ended the node in a TimeoutError ("federation: error: ").
    async with key_authority(tmp_path, cluster) as (stub, _, nodes):
        assert await issue(stub) is None
        keys = nodes[-1]
        stalled = cluster.stall()
        try:
            keys.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(keys.process.wait(), 30)
        finally:
            cluster.resume(stalled)
        log = (tmp_path / "home" / "keys.log").read_text()
        assert code == 0, log[-2000:]
        assert "federation: error" not in log
        assert "connections dropped" in log
