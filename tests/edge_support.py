"""Helpers for the edge broker tests: a real broker on mTLS + its enrollment port,
in this process or as ``federation node`` processes (brokers, a memory node)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from federation.config import EdgeConfig, GrpcConfig, MemoryConfig
from federation.db import Database
from federation.edge.broker import EdgeBroker
from federation.edge.device.agent import AgentOptions, EdgeAgent
from federation.edge.device.client import Stub, enroll
from federation.edge.enrollment import create_token
from federation.errors import FederationError
from federation.launch.children import terminate
from federation.memory.store import MemoryStore
from federation.server import NodeServer
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from nodes.edge import registration
from tests.support import TestPKI

BrokerNode: TypeAlias = "tuple[NodeServer, EdgeBroker]"
"""A serving broker (``broker_server``) and its domain object, as test fixtures give them."""

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
    broker = EdgeBroker.create(database.pool, config, home, pki.ca.edge_signer(), memory)
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


async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    """Poll ``predicate``: agents and processes have no event to wait on."""
    async with asyncio.timeout(seconds):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def far_agent(pki: TestPKI, server: NodeServer, broker: EdgeBroker,
                    options: AgentOptions) -> AsyncIterator[None]:
    """The agent of device ``far``, 120 ms away (simulated), running for the block, which
    starts once the broker has measured that latency; at its end it must be 120-400 ms."""
    stop = asyncio.Event()
    agent = EdgeAgent(device_stub(pki, server.port, "far"),
                      dataclasses.replace(options, simulate_latency_ms=120))
    running = asyncio.create_task(agent.run(stop))

    async def measured() -> bool:
        with contextlib.suppress(FederationError):  # not registered yet
            return (await broker.devices.get("far")).smoothed_latency_ms is not None
        return False

    try:
        await wait_for(measured)
        yield
    finally:
        stop.set()
        await running
    latency = (await broker.devices.get("far")).smoothed_latency_ms
    assert latency is not None and 120 <= latency < 400


async def enroll_device(
    pool: asyncpg.Pool, pki: TestPKI, enrollment_port: int, name: str, out: Path
) -> Path:
    """The real path: an operator token, then Enroll with a key made here; returns the
    credentials directory (cert.pem, key.pem, ca.pem)."""
    token = await create_token(pool, name, dt.timedelta(minutes=5), actor="ops")
    out.mkdir(parents=True, exist_ok=True)
    await enroll(f"localhost:{enrollment_port}", pki.ca.paths.ca_cert.read_bytes(), token,
                 name, out)
    return out


# -- node processes --------------------------------------------------------------


def broker_environment(home: Path, pg_url: str, config: EdgeConfig = FAST_EDGE) -> dict[str, str]:
    """The environment of a broker process: this one without FEDERATION_* settings, plus
    the home, the database and every ``[edge]`` setting of ``config`` that differs from
    the default (so a process is tuned exactly like :func:`broker_server`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {"FEDERATION_HOME": str(home), "FEDERATION_DATABASE_URL": pg_url}
    default = EdgeConfig()
    for item in dataclasses.fields(EdgeConfig):
        value = getattr(config, item.name)
        if value != getattr(default, item.name):
            env[f"FEDERATION_EDGE_{item.name.upper()}"] = str(value)
    return env


@dataclasses.dataclass(frozen=True)
class NodeProcess:
    """A ``federation node`` process and the ports of its ready file."""

    process: asyncio.subprocess.Process
    grpc_port: int
    enrollment_port: int
    """The broker's second port (0 for other roles)."""
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"localhost:{self.grpc_port}"


async def start_node(
    env: dict[str, str], workdir: Path, role: str = "broker", name: str = "broker"
) -> NodeProcess:
    """``federation node --role ROLE`` on free ports; returns once its ready file exists.
    Its identity (``ROLE``/``local``) must have been issued under the home."""
    ready = workdir / f"{name}.json"
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "node", "--role", role,
            "--listen", "127.0.0.1:0", "--ready-file", str(ready), env=env,
            stdout=log, stderr=log,
        )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.returncode is not None or time.monotonic() > deadline:
            await stop_process(process)
            raise AssertionError(f"{role} node did not start:\n{log_path.read_text()}")
        await asyncio.sleep(0.05)
    ports = json.loads(ready.read_text())
    return NodeProcess(process, ports["grpc_port"], ports.get("enrollment_port", 0),
                       ports["metrics_port"], log_path)


async def stop_process(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after ``grace`` seconds."""
    await terminate(process, grace)


@contextlib.asynccontextmanager
async def node_processes(
    pki: TestPKI, env: dict[str, str], workdir: Path, count: int, role: str = "broker"
) -> AsyncIterator[list[NodeProcess]]:
    """``count`` node processes of ``role`` sharing the home (CA, blobs) and the database,
    started at once and stopped gracefully (SIGTERM) at the end."""
    pki.identity(role, "local")  # what `federation node` loads for node_name "local"
    started = await asyncio.gather(
        *(start_node(env, workdir, role, f"{role}{n}") for n in range(count)),
        return_exceptions=True,
    )
    nodes = [node for node in started if isinstance(node, NodeProcess)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield nodes
    finally:
        await asyncio.gather(*(stop_process(node.process) for node in nodes))


async def rpc_count(metrics_port: int, method: str, code: str = "OK") -> float:
    """``federation_grpc_server_handled_total`` of one method and code, from a process's
    Prometheus endpoint: what the broker itself says it served."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "federation_grpc_server_handled_total"
                and sample.labels.get("grpc_method") == method
                and sample.labels.get("grpc_code") == code
            ):
                total += sample.value
    return total
