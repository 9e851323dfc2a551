"""The audit record of a gateway request.

Every authenticated request is recorded in thermal memory as one
:class:`~federation.memory.records.AuditEntry`: action ``gateway.request``, the
API key as actor, the model as subject, the request's figures as attributes,
written through the memory client (:class:`~federation.memory.client.GrpcAuditSink`).
:class:`RequestRecord` is what the gateway knows of a request when it ends; it is
also the outbox payload of a record spooled for later delivery, so its fields stay
as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from federation.memory.records import AuditEntry

GATEWAY_REQUEST_ACTION: Final = "gateway.request"


@dataclass(frozen=True)
class RequestRecord:
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
    client_request_id: str = ""
    """The client's ``X-Request-Id`` (validated), a label only: ``request_id`` is the
    gateway's own. Defaulted, so records spooled before it existed still load."""

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
            "client_request_id": self.client_request_id,
        }

    def audit_entry(self) -> AuditEntry:
        return AuditEntry(
            actor=self.key_id, action=GATEWAY_REQUEST_ACTION, tenant_id=self.tenant_id,
            subject=self.model, attributes=self.attributes(), request_id=self.request_id,
        )
