"""The real key authority and thermal memory nodes for the HTTP tests.

Both nodes run as ``federation node`` runs them (``create_service`` on a real mTLS
``NodeServer``, one Prometheus registry shared by the runtime and the server) over a
real PostgreSQL database. Tests mint keys through the key authority's gRPC API with
an operator (``admin``) identity, wire the gateway to both nodes through
``peers.keys`` / ``peers.memory`` exactly as production does, and observe what the
gateway did through the nodes' own APIs: quota status, key state, the audit trail
and the key authority's RPC counters.

Starting the pair costs a database and two servers; a test module may share one
:class:`KeyNodes` across its tests (keys are minted per test, so tests stay apart).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType

import grpc
from google.protobuf.duration_pb2 import Duration
from prometheus_client import CollectorRegistry

from federation.config import GrpcConfig, KeysConfig, PeersConfig, Settings
from federation.db import Database
from federation.keys.authority import KeyAuthority
from federation.keys.models import IssueRequest
from federation.memory.client import GrpcAuditSink
from federation.memory.store import MemoryStore
from federation.server import NodeServer
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import key_authority_pb2_grpc as kgrpc
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from gateway_http.audit import GATEWAY_REQUEST_ACTION
from nodes import keys as keys_module
from nodes import memory as memory_module
from nodes.runtime import NodeRuntime
from tests.support import TestPKI

KEYS_SERVICE = "federation.v1.KeyAuthorityService"


async def issue_key(database: Database, store: MemoryStore, **limits: int) -> str:
    """A chat key of tenant ``acme`` issued by the key authority in this process; its id."""
    authority = KeyAuthority(database.pool, KeysConfig(), store)
    issued = await authority.issue(IssueRequest("acme", ["chat"], **limits), actor="admin")
    return issued.view.record.key_id


@dataclass
class ServedNode:
    """One node as the daemon hosts it; ``registry`` holds its RPC metrics."""

    server: NodeServer
    registry: CollectorRegistry
    _stack: contextlib.AsyncExitStack

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def stop(self) -> None:
        await self._stack.aclose()


async def serve_node(pki: TestPKI, role: str, module: ModuleType, settings: Settings,
                     database: Database) -> ServedNode:
    stack = contextlib.AsyncExitStack()
    try:
        registry = CollectorRegistry()
        cleanup = await stack.enter_async_context(contextlib.AsyncExitStack())
        credentials = pki.identity(role, "server")
        runtime = NodeRuntime(settings, role, credentials, database, registry, cleanup)
        registration = await module.create_service(runtime)
        server = NodeServer(
            [registration], trust_domain=pki.ca.trust_domain,
            grpc_config=GrpcConfig(grace_seconds=0.2), listen="127.0.0.1:0",
            credentials=credentials, metrics_port=None, registry=registry,
        )
        await server.start()
        stack.push_async_callback(server.stop, 0)
    except BaseException:
        await stack.aclose()
        raise
    return ServedNode(server, registry, stack)


@dataclass
class KeyNodes:
    """The key authority and the thermal memory it (and the gateway) audits to."""

    pki: TestPKI
    database: Database
    keys_node: ServedNode
    memory_address: str
    memory_node: ServedNode | None
    """``None`` when the memory node belongs to someone else (e.g. a council stack)."""
    keys: kgrpc.KeyAuthorityServiceAsyncStub
    """The key authority as an operator sees it."""
    memory: mgrpc.ThermalMemoryServiceAsyncStub
    """Thermal memory as an operator sees it."""
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    """The stubs' channels (a stub does not keep its channel alive); closed by ``key_nodes``."""

    @property
    def keys_address(self) -> str:
        return self.keys_node.address

    def wire(self, settings: Settings) -> Settings:
        """``settings`` with ``peers.keys`` and ``peers.memory`` pointing at these nodes."""
        return dataclasses.replace(settings, peers=dataclasses.replace(
            settings.peers, keys=self.keys_address, memory=self.memory_address))

    # -- minting and managing keys (the operator's API) ------------------------------------

    async def issue(self, tenant: str, scopes: tuple[str, ...] | list[str] = ("chat",), *,
                    requests_per_minute: int | None = None, token_quota: int | None = None,
                    quota_period_seconds: int = 3600) -> kpb.IssueKeyResponse:
        """A key minted by the key authority (``.secret``, ``.key.key_id``)."""
        request = kpb.IssueKeyRequest(tenant_id=tenant, scopes=list(scopes))
        if requests_per_minute is not None:
            request.requests_per_minute = requests_per_minute
        if token_quota is not None:
            request.token_quota = token_quota
            request.quota_period.CopyFrom(Duration(seconds=quota_period_seconds))
        return await self.keys.IssueKey(request)

    async def key(self, tenant: str, key_id: str) -> kpb.ApiKey:
        listed = await self.keys.ListKeys(kpb.ListKeysRequest(
            tenant_id=tenant, include_revoked=True, page_size=1000))
        (found,) = [k for k in listed.keys if k.key_id == key_id]
        return found

    async def quota(self, key_id: str) -> kpb.QuotaStatus:
        """The key's quota window as the key authority holds it (charges nothing)."""
        return (await self.keys.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id))).status

    async def spend_requests(self, key_id: str, count: int) -> None:
        """Use up ``count`` requests of the key's per-minute budget, as a gateway would."""
        for _ in range(count):
            await self.keys.ConsumeQuota(kpb.ConsumeQuotaRequest(key_id=key_id, is_request=True))

    async def suspend(self, tenant: str, key_id: str, reason: str = "test") -> None:
        """Suspend the key the way the key authority does (the pheromone-decay job calls
        this same ``KeyAuthority.suspend``): the state change in PostgreSQL, its strength
        sample, and its ``key.suspend`` record in thermal memory. The gRPC API has no
        suspend call: suspension is the key authority's own decision."""
        channel = self.pki.channel(self.memory_address, "keys", "server")
        try:
            authority = KeyAuthority(self.database.pool, Settings().keys,
                                     GrpcAuditSink(channel, timeout_seconds=5))
            view = await authority.get(key_id, tenant)
            suspended = await authority.suspend(view.record, "keys/test", reason)
            await authority.stop()
        finally:
            await channel.close()
        assert suspended, f"{key_id} was not active"
        assert (await self.key(tenant, key_id)).state == kpb.KEY_STATE_SUSPENDED
        audited = await self.records(tenant, action_prefix="key.suspend")
        assert key_id in [r.subject for r in audited]

    # -- observing -------------------------------------------------------------------------

    async def records(self, tenant: str, *, request_id: str = "", action_prefix: str = ""
                      ) -> list[mpb.MemoryRecord]:
        """Thermal-memory records of ``tenant``, newest first."""
        found = await self.memory.SearchMemory(mpb.SearchMemoryRequest(
            tenant_id=tenant, request_id=request_id, action_prefix=action_prefix,
            page_size=1000))
        return list(found.records)

    async def gateway_records(self, tenant: str, request_id: str = "") -> list[mpb.MemoryRecord]:
        """The gateway's per-request audit records of ``tenant``, newest first."""
        return await self.records(tenant, request_id=request_id,
                                  action_prefix=GATEWAY_REQUEST_ACTION)

    def rpcs(self, method: str, code: str = "OK") -> float:
        """How many ``method`` calls the key authority has answered with ``code``."""
        value = self.keys_node.registry.get_sample_value(
            "federation_grpc_server_handled_total",
            {"grpc_service": KEYS_SERVICE, "grpc_method": method, "grpc_code": code})
        return value or 0.0


@contextlib.asynccontextmanager
async def key_nodes(pki: TestPKI, database: Database, *, memory_address: str | None = None
                    ) -> AsyncIterator[KeyNodes]:
    """Start thermal memory (unless ``memory_address`` names a running one) and the key
    authority auditing to it; yield them with operator stubs; stop them."""
    async with contextlib.AsyncExitStack() as stack:
        memory_node: ServedNode | None = None
        if memory_address is None:
            memory_node = await serve_node(pki, "memory", memory_module, Settings(), database)
            stack.push_async_callback(memory_node.stop)
            memory_address = memory_node.address
        keys_settings = Settings(peers=PeersConfig(memory=memory_address))
        keys_node = await serve_node(pki, "keys", keys_module, keys_settings, database)
        stack.push_async_callback(keys_node.stop)
        channels = [pki.channel(keys_node.address, "admin"),
                    pki.channel(memory_address, "admin")]
        for channel in channels:
            stack.push_async_callback(channel.close, None)
        yield KeyNodes(pki, database, keys_node, memory_address, memory_node,
                       kgrpc.KeyAuthorityServiceStub(channels[0]),
                       mgrpc.ThermalMemoryServiceStub(channels[1]), channels)
