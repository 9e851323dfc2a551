"""ThermalMemoryService: a thin adapter over :class:`federation.memory.store.MemoryStore`.

Tenant scoping: ``tenant_id`` names the tenant whose records are read. The
gateway, the guardian and operators may name any tenant; only operators
(role ``admin``) may leave it empty to mean every tenant.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from federation.errors import ErrorCode, FederationError
from federation.interceptor import current_caller
from federation.memory.convert import TIER_FROM_PROTO, record_to_proto
from federation.memory.decay import temperature_decay_job
from federation.memory.records import AuditEntry
from federation.memory.store import MemoryStore, SearchQuery
from federation.server import ServiceRegistration
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ThermalMemoryService"].full_name
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_TENANT_READERS = frozenset({"admin", "gateway", "guardian"})


def tenant_scope(tenant_id: str) -> str | None:
    """The tenant the caller may read: ``None`` (all) only for operators."""
    role = current_caller().role
    if role not in _TENANT_READERS:
        raise FederationError(ErrorCode.PERMISSION_DENIED,
                              f"role {role!r} may not read thermal memory")
    if tenant_id:
        return tenant_id
    if role == "admin":
        return None
    raise FederationError(ErrorCode.INVALID_ARGUMENT, "tenant_id is required", param="tenant_id")


class ThermalMemoryServicer(pb_grpc.ThermalMemoryServiceServicer):
    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def RecordMemory(
        self, request: pb.RecordMemoryRequest, context: Context
    ) -> pb.RecordMemoryResponse:
        if not request.action:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "action is required",
                                  param="action")
        if request.HasField("temperature") and request.temperature > 100:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "temperature is 0 to 100",
                                  param="temperature")
        record = await self._store.record(AuditEntry(
            actor=request.actor or current_caller().spiffe_id, action=request.action,
            tenant_id=request.tenant_id, subject=request.subject,
            attributes=dict(request.payload.attributes), body=request.payload.body,
            temperature=request.temperature if request.HasField("temperature") else None,
        ))
        return pb.RecordMemoryResponse(record=record_to_proto(record))

    async def ReadMemory(
        self, request: pb.ReadMemoryRequest, context: Context
    ) -> pb.ReadMemoryResponse:
        record = await self._store.read(tenant_scope(request.tenant_id), request.sequence)
        return pb.ReadMemoryResponse(record=record_to_proto(record))

    async def SearchMemory(
        self, request: pb.SearchMemoryRequest, context: Context
    ) -> pb.SearchMemoryResponse:
        page = await self._store.search(SearchQuery(
            tenant_id=tenant_scope(request.tenant_id), action_prefix=request.action_prefix,
            request_id=request.request_id, actor=request.actor,
            start_time=request.start_time.ToDatetime() if request.HasField("start_time") else None,
            end_time=request.end_time.ToDatetime() if request.HasField("end_time") else None,
            tier=TIER_FROM_PROTO.get(request.tier), page_size=request.page_size,
            page_token=request.page_token,
        ))
        return pb.SearchMemoryResponse(records=[record_to_proto(r) for r in page.records],
                                       next_page_token=page.next_page_token)

    async def VerifyChain(
        self, request: pb.VerifyChainRequest, context: Context
    ) -> pb.VerifyChainResponse:
        report = await self._store.verify_chain(request.from_sequence, request.to_sequence)
        return pb.VerifyChainResponse(
            intact=report.intact, records_checked=report.records_checked,
            first_bad_sequence=report.first_bad_sequence, problem=report.problem,
        )


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    config = runtime.settings.memory
    store = MemoryStore(runtime.require_database().pool, config)
    await store.start()
    runtime.cleanup.push_async_callback(store.stop)
    decay = temperature_decay_job(store, config.decay_interval_seconds)
    await decay.start()
    runtime.cleanup.push_async_callback(decay.stop)
    servicer = ThermalMemoryServicer(store)

    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_ThermalMemoryServiceServicer_to_server(servicer, server)

    return ServiceRegistration(SERVICE_NAME, add)
