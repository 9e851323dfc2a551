"""The audit record of a gateway request, and its writer to thermal memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import grpc

from federation.errors import from_rpc_error
from federation.v1 import thermal_memory_pb2, thermal_memory_pb2_grpc


@dataclass(frozen=True)
class AuditEntry:
    """One gateway request, as recorded in thermal memory. Never holds prompt text."""

    request_id: str
    key_id: str
    tenant_id: str
    route: str
    model: str
    status: int
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stream: bool = False
    finish_reason: str = ""
    error_code: str = ""

    def attributes(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "route": self.route,
            "model": self.model,
            "status": str(self.status),
            "latency_ms": f"{self.latency_ms:.3f}",
            "prompt_tokens": str(self.prompt_tokens),
            "completion_tokens": str(self.completion_tokens),
            "total_tokens": str(self.prompt_tokens + self.completion_tokens),
            "stream": str(self.stream).lower(),
            "finish_reason": self.finish_reason,
            "error_code": self.error_code,
        }


class AuditWriter(Protocol):
    async def record(self, entry: AuditEntry) -> None: ...


class GrpcAuditWriter:
    ACTION = "gateway.request"

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = thermal_memory_pb2_grpc.ThermalMemoryServiceStub(channel)
        self._timeout = timeout

    async def record(self, entry: AuditEntry) -> None:
        try:
            await self._stub.RecordMemory(
                thermal_memory_pb2.RecordMemoryRequest(
                    tenant_id=entry.tenant_id, actor=entry.key_id, action=self.ACTION,
                    subject=entry.model,
                    payload=thermal_memory_pb2.AuditPayload(attributes=entry.attributes()),
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
