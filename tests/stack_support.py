"""The whole federation in the test process: real memory, key authority and guardian nodes
(real PostgreSQL, mTLS), a real inference node, and the gateway app exactly as
``federation gateway`` builds it (database + guardian configured, so the vault routes and
tenant transcripts are wired). Only the HTTP client is the test."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from federation.config import CouncilConfig, GrpcConfig, PeersConfig, Settings
from federation.council.engine import Council
from federation.council.scripted_backend import ScriptedCouncilBackend
from federation.db import Database
from federation.inference.client import InferenceRouter
from federation.inference.test_backend import TestBackend
from federation.memory.client import GrpcAuditSink
from federation.pki import ADMIN_NAME
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import key_authority_pb2_grpc as kgrpc
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from gateway_http.app import GatewayServer
from nodes import council as council_node
from nodes import guardian as guardian_node
from nodes import keys as keys_node
from nodes import memory as memory_node
from tests.council_support import inference_node, scripted_roster
from tests.gateway_support import gateway_settings, inference_nodes
from tests.nodes_support import RunningNode, running
from tests.support import TestPKI, serving

MODEL = "test-model"


@dataclass
class Stack:
    pki: TestPKI
    memory: RunningNode
    keys_node: RunningNode
    guardian: RunningNode
    gateway: GatewayServer
    backend: TestBackend
    keys: kgrpc.KeyAuthorityServiceAsyncStub
    memory_admin: mgrpc.ThermalMemoryServiceAsyncStub
    http: aiohttp.ClientSession
    settings: Settings
    """The gateway's settings (also the operator's: home, peers, database URL)."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    async def issue(self, tenant: str, scopes: list[str]) -> kpb.IssueKeyResponse:
        """A key issued by the real key authority (``.secret``, ``.key.key_id``)."""
        return await self.keys.IssueKey(kpb.IssueKeyRequest(tenant_id=tenant, scopes=scopes))

    async def records(self, tenant: str, action_prefix: str) -> list[mpb.MemoryRecord]:
        found = await self.memory_admin.SearchMemory(mpb.SearchMemoryRequest(
            tenant_id=tenant, action_prefix=action_prefix, page_size=1000))
        return list(found.records)

    async def call(self, method: str, path: str, key: str, *, share: str | None = None,
                   json: Any = None) -> tuple[int, dict[str, Any], dict[str, str]]:
        headers = {"Authorization": f"Bearer {key}"}
        if share is not None:
            headers["X-Federation-Share"] = share
        async with self.http.request(method, self.base + path, headers=headers,
                                     json=json) as response:
            return response.status, await response.json(), dict(response.headers)


@contextlib.asynccontextmanager
async def council_node_for(stack: contextlib.AsyncExitStack, pki: TestPKI,
                           memory_address: str, members: ScriptedCouncilBackend
                           ) -> AsyncIterator[str]:
    """A council node whose scripted members are served by an inference node of their own,
    auditing to ``memory_address``; yields its address."""
    server = await stack.enter_async_context(inference_node(pki, [members], "inf-council"))
    router = InferenceRouter([f"127.0.0.1:{server.port}"], pki.identity("council", "node"),
                             GrpcConfig(), refresh_seconds=0.5)
    await router.start()
    memory = pki.channel(memory_address, "council", "node")
    try:
        council = Council(scripted_roster(), router, GrpcAuditSink(memory, timeout_seconds=5),
                          CouncilConfig(member_deadline_seconds=5, overall_deadline_seconds=20,
                                        synthesis_deadline_seconds=5))
        registration = council_node.registration(council_node.CouncilServicer(council))
        async with serving(pki, [registration], role="council") as council_server:
            yield f"127.0.0.1:{council_server.port}"
    finally:
        await router.stop()
        await memory.close()


@contextlib.asynccontextmanager
async def federation_stack(tmp_path: Path, database: Database, pg_url: str,
                           gateway_config: dict[str, Any] | None = None,
                           council: ScriptedCouncilBackend | None = None,
                           **guardian_config: Any) -> AsyncIterator[Stack]:
    """``council``: also a council node (its members played by ``council``), the gateway's
    ``peers.council``."""
    pki = TestPKI(tmp_path / "home")
    pki.identity("admin", ADMIN_NAME)
    backend = TestBackend()
    memory = RunningNode(pki, "memory", Settings(), database, memory_node)
    keys = RunningNode(pki, "keys", Settings(), database, keys_node)
    guardian = RunningNode(pki, "guardian", Settings(), database, guardian_node)
    async with contextlib.AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(inference_nodes(pki, [backend]))
        base = gateway_settings(pki.home, [nodes[0].address], **(gateway_config or {}))
        settings = dataclasses.replace(
            base,
            peers=PeersConfig(memory=memory.address, keys=keys.address,
                              guardian=guardian.address, inference=nodes[0].address),
            database=dataclasses.replace(base.database, url=pg_url),
            guardian=dataclasses.replace(base.guardian, **guardian_config),
        )
        memory.settings = keys.settings = guardian.settings = settings
        await stack.enter_async_context(running(memory, guardian, keys))
        if council is not None:
            address = await stack.enter_async_context(
                council_node_for(stack, pki, memory.address, council))
            settings = dataclasses.replace(
                settings, peers=dataclasses.replace(settings.peers, council=address))
        gateway = GatewayServer(settings, pki.identity("gateway"))
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        channels: list[grpc.aio.Channel] = [pki.channel(keys.address, "admin"),
                                            pki.channel(memory.address, "admin")]
        for channel in channels:
            stack.push_async_callback(channel.close, None)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Stack(pki, memory, keys, guardian, gateway, backend,
                    kgrpc.KeyAuthorityServiceStub(channels[0]),
                    mgrpc.ThermalMemoryServiceStub(channels[1]), http, settings)
