"""A whole council stack on loopback for tests and the benchmark.

Real pieces only: an inference node serving the scripted backend, the
InferenceRouter the gateway uses, a thermal-memory node over PostgreSQL, and
the council node, all mTLS with identities from an in-test CA.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc

from federation.config import CouncilConfig, GrpcConfig, MemoryConfig
from federation.council.engine import Council
from federation.council.members import Roster, load_roster, with_model
from federation.council.scripted_backend import MODEL, ScriptedCouncilBackend
from federation.db import Database
from federation.inference.backend import Backend, BackendSet
from federation.inference.client import InferenceRouter
from federation.memory.client import GrpcAuditSink
from federation.memory.sink import AuditSink
from federation.memory.store import MemoryStore
from federation.server import NodeServer, ServiceRegistration
from federation.v1 import council_pb2_grpc, thermal_memory_pb2_grpc
from nodes import council as council_node
from nodes.inference import InferenceServicer
from nodes.inference import registration as inference_registration
from nodes.memory import ThermalMemoryServicer
from tests.support import TestPKI, serving


def scripted_roster(model: str = MODEL) -> Roster:
    return with_model(load_roster(), model)


@dataclass
class CouncilStack:
    pki: TestPKI
    council_server: NodeServer
    memory_server: NodeServer
    store: MemoryStore
    council: Council
    router: InferenceRouter

    @property
    def council_address(self) -> str:
        return f"127.0.0.1:{self.council_server.port}"

    def stub(self, role: str = "admin") -> council_pb2_grpc.CouncilServiceStub:
        return council_pb2_grpc.CouncilServiceStub(self.channel(role))

    def channel(self, role: str = "admin") -> grpc.aio.Channel:
        chan = self.pki.channel(self.council_address, role, "client")
        self._channels.append(chan)
        return chan

    _channels: list[grpc.aio.Channel] = field(default_factory=list)


def memory_registration(store: MemoryStore) -> ServiceRegistration:
    servicer = ThermalMemoryServicer(store)
    return ServiceRegistration(
        "federation.v1.ThermalMemoryService",
        lambda server: thermal_memory_pb2_grpc.add_ThermalMemoryServiceServicer_to_server(
            servicer, server),
    )


@contextlib.asynccontextmanager
async def inference_node(pki: TestPKI, backends: Sequence[Backend], name: str = "inf0"
                         ) -> AsyncIterator[NodeServer]:
    backend_set = BackendSet(backends)
    await backend_set.start()
    server = NodeServer(
        [inference_registration(InferenceServicer(backend_set))],
        trust_domain=pki.ca.trust_domain, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=pki.identity("inference", name), metrics_port=None,
    )
    try:
        await server.start()
        yield server
    finally:
        await server.stop(0)
        await backend_set.stop()


@contextlib.asynccontextmanager
async def council_stack(
    pki: TestPKI,
    database: Database,
    backend: ScriptedCouncilBackend | Sequence[Backend],
    *,
    roster: Roster | None = None,
    config: CouncilConfig | None = None,
    sink_wrapper: type | None = None,
) -> AsyncIterator[CouncilStack]:
    """Start memory, inference and council nodes; yield the stack; stop everything."""
    backends = [backend] if isinstance(backend, ScriptedCouncilBackend) else list(backend)
    store = MemoryStore(database.pool, MemoryConfig())
    await store.start()
    try:
        async with (
            serving(pki, [memory_registration(store)], role="memory") as memory_server,
            inference_node(pki, backends) as inference_server,
        ):
            router = InferenceRouter([f"127.0.0.1:{inference_server.port}"],
                                     pki.identity("council", "node"), GrpcConfig(),
                                     refresh_seconds=0.5)
            await router.start()
            memory_channel = pki.channel(f"127.0.0.1:{memory_server.port}", "council", "node")
            sink: AuditSink = GrpcAuditSink(memory_channel, timeout_seconds=5)
            if sink_wrapper is not None:
                sink = sink_wrapper(sink)
            council = Council(roster or scripted_roster(), router, sink,
                              config or CouncilConfig(member_deadline_seconds=5,
                                                      overall_deadline_seconds=20,
                                                      synthesis_deadline_seconds=5))
            registration = council_node.registration(council_node.CouncilServicer(council))
            try:
                async with serving(pki, [registration], role="council") as council_server:
                    stack = CouncilStack(pki, council_server, memory_server, store, council,
                                         router)
                    try:
                        yield stack
                    finally:
                        for chan in stack._channels:
                            await chan.close()
            finally:
                await router.stop()
                await memory_channel.close()
    finally:
        await store.stop()


@contextlib.asynccontextmanager
async def streamed_vote(base: str, secret: str) -> AsyncIterator[aiohttp.ClientResponse]:
    """``POST /v1/council/vote`` streamed ("Hang on?"), answered 200, open for the block."""
    async with aiohttp.ClientSession() as session, session.post(
        base + "/v1/council/vote", json={"question": "Hang on?", "stream": True},
        headers={"Authorization": f"Bearer {secret}"},
    ) as response:
        assert response.status == 200
        yield response


async def wait_until_idle(backend: ScriptedCouncilBackend, seconds: float = 2.0) -> None:
    """Members hang with the default 60 s deadline: only a cancellation ends them sooner."""
    async with asyncio.timeout(seconds):
        while backend.in_flight:  # noqa: ASYNC110 - the backend has no event to await
            await asyncio.sleep(0.01)
