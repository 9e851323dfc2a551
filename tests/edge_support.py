"""Helpers for the edge broker tests: a real broker on mTLS + its enrollment port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from federation.config import EdgeConfig, GrpcConfig, MemoryConfig
from federation.db import Database
from federation.edge.broker import EdgeBroker
from federation.edge_device import Stub
from federation.memory.store import MemoryStore
from federation.server import NodeServer
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from nodes.edge_broker import registration
from tests.support import TestPKI

FAST_EDGE = EdgeConfig(
    revocation_cache_seconds=0.0,
    reaper_interval_seconds=0.05,
    audit_flush_seconds=0.05,
    watch_poll_seconds=0.02,
    retry_backoff_base_seconds=0.01,
    retry_backoff_cap_seconds=0.01,
)


@contextlib.asynccontextmanager
async def broker_server(
    pki: TestPKI,
    database: Database,
    home: Path,
    config: EdgeConfig = FAST_EDGE,
    *,
    background: bool = True,
) -> AsyncIterator[tuple[NodeServer, EdgeBroker, MemoryStore]]:
    """A broker on 127.0.0.1:0 (mTLS) and an enrollment port, auditing into the
    real thermal memory store (``MemoryStore``) on the same database."""
    memory = MemoryStore(database.pool, MemoryConfig())
    await memory.start()
    broker = EdgeBroker.create(database.pool, config, home, pki.ca, memory)
    server = NodeServer(
        [registration(broker)],
        trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0",
        credentials=pki.identity("broker", "server"),
        metrics_port=None,
        enrollment_listen="127.0.0.1:0",
    )
    await server.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if background:
                await stack.enter_async_context(broker.background())
            yield server, broker, memory
    finally:
        await server.stop(0)
        await memory.stop()


def device_stub(pki: TestPKI, port: int, name: str, role: str = "edge") -> Stub:
    channel = pki.channel(f"127.0.0.1:{port}", role, name)
    stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
    stub.channel = channel  # type: ignore[attr-defined]  # a collected channel closes itself
    return stub


def admin_stub(pki: TestPKI, port: int) -> Stub:
    return device_stub(pki, port, "ops", role="admin")


async def register(stub: Stub) -> None:
    await stub.RegisterDevice(
        pb.RegisterDeviceRequest(capabilities=pb.DeviceCapabilities(cpu_cores=4))
    )
