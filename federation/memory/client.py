"""An :class:`~federation.memory.sink.AuditSink` that writes through ThermalMemoryService.

Used by every node except the memory node itself. ``record`` returns only
after the memory node has committed the record, and raises a
:class:`FederationError` (UNAVAILABLE, DEADLINE_EXCEEDED, ...) otherwise, so the
caller can fail closed.
"""

from __future__ import annotations

import grpc

from federation.errors import from_rpc_error
from federation.logs import REQUEST_ID_HEADER
from federation.memory.convert import record_from_proto
from federation.memory.records import AuditEntry, MemoryRecord
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc


class GrpcAuditSink:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_seconds: float = 10.0) -> None:
        self._stub = pb_grpc.ThermalMemoryServiceStub(channel)
        self._timeout = timeout_seconds

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        request = pb.RecordMemoryRequest(
            tenant_id=entry.tenant_id, actor=entry.actor, action=entry.action,
            subject=entry.subject,
            payload=pb.AuditPayload(attributes=dict(entry.attributes), body=entry.body),
            temperature=entry.temperature,
        )
        # Without an explicit id the channel interceptor forwards the current one.
        metadata = ((REQUEST_ID_HEADER, entry.request_id),) if entry.request_id else None
        try:
            response = await self._stub.RecordMemory(
                request, timeout=self._timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return record_from_proto(response.record)
