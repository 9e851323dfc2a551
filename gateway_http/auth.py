"""API-key authentication, quota charging and the per-request audit record.

The gateway depends on two small protocols, :class:`KeyVerifier` and
:class:`AuditWriter`; their production implementations call the key
authority and thermal memory over mTLS gRPC. Verification results are cached
for a few seconds (refusals for less), so the hot path does not pay a round
trip per request; the price is that a revocation takes up to the TTL to bite.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from aiohttp import web

from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.prototime import to_datetime
from federation.v1 import (
    key_authority_pb2,
    key_authority_pb2_grpc,
    thermal_memory_pb2,
    thermal_memory_pb2_grpc,
)

log = logging.getLogger(__name__)

CHAT_SCOPE = "chat"
_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class KeyPrincipal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Reservation:
    """Tokens reserved against a key's quota before a generation, settled after it."""

    key_id: str
    reservation_id: str
    tokens: int
    token_budget: int | None
    """What the generation may use, prompt and completion together (the inference node
    enforces it); ``None`` when the key has no token quota."""
    period_end: float | None = None
    """When the key's token quota period ends (``time.time()`` scale)."""

    def retry_after(self) -> float | None:
        """Seconds until the token quota period resets, if the key has one."""
        return None if self.period_end is None else max(1.0, self.period_end - time.time())


class KeyVerifier(Protocol):
    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        """The key's principal; FederationError UNAUTHENTICATED / PERMISSION_DENIED."""

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> Reservation:
        """Count the request and reserve up to ``tokens`` (capped to what remains).

        FederationError RESOURCE_EXHAUSTED (request rate) or INSUFFICIENT_QUOTA (fewer
        than ``min_tokens`` left), with retry_after_seconds; nothing is charged then.
        """

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Charge what the request used and release the rest; idempotent."""


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


# ---- production implementations ----------------------------------------------------------------

class GrpcKeyVerifier:
    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = key_authority_pb2_grpc.KeyAuthorityServiceStub(channel)
        self._timeout = timeout

    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        try:
            response = await self._stub.VerifyKey(
                key_authority_pb2.VerifyKeyRequest(key=key, source=source, required_scope=scope),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        k = response.key
        return KeyPrincipal(k.key_id, k.tenant_id, frozenset(k.scopes))

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> Reservation:
        try:
            response = await self._stub.ReserveQuota(
                key_authority_pb2.ReserveQuotaRequest(
                    key_id=key_id, tokens=tokens, min_tokens=min_tokens),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if error.spec.http_status == 429 and error.retry_after_seconds is None:
                error.retry_after_seconds = 1.0
            raise error from None
        status = response.status
        return Reservation(
            key_id, response.reservation_id, response.reserved_tokens,
            response.token_budget if response.HasField("token_budget") else None,
            to_datetime(status.period_end_time).timestamp()
            if status.HasField("period_end_time") else None,
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        try:
            await self._stub.SettleQuota(
                key_authority_pb2.SettleQuotaRequest(
                    key_id=reservation.key_id, reservation_id=reservation.reservation_id,
                    used_tokens=used_tokens),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


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


# ---- caching and background auditing -------------------------------------------------------

class CachedKeyVerifier:
    """Remembers verification results briefly; quota calls always go through.

    A verdict is remembered per (key, scope, source): the key authority suspends a key
    per source after repeated failures, so one source's answer, success or refusal,
    must never answer another source's request.
    """

    def __init__(self, inner: KeyVerifier, ttl: float, negative_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._cache: dict[tuple[bytes, str, str],
                          tuple[float, KeyPrincipal | FederationError]] = {}

    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        # Keyed by a hash so raw secrets do not sit in a long-lived dict.
        slot = (hashlib.sha256(key.encode()).digest(), scope, source)
        now = self._clock()
        cached = self._cache.get(slot)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], FederationError):
                raise cached[1]
            return cached[1]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()  # flooded with distinct keys: forget rather than grow
        try:
            principal = await self._inner.verify(key, scope=scope, source=source)
        except FederationError as exc:
            if exc.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.PERMISSION_DENIED):
                self._cache[slot] = (now + self._negative_ttl, exc)
            raise
        self._cache[slot] = (now + self._ttl, principal)
        return principal

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> Reservation:
        return await self._inner.reserve(key_id, tokens=tokens, min_tokens=min_tokens)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        await self._inner.settle(reservation, used_tokens)


class BackgroundTasks:
    """Work that must not delay the response (audit, post-charge) but must not be lost
    at shutdown: tracked here and awaited by ``drain``."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, None], what: str,
              on_failure: Callable[[], None] | None = None) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                self.failures += 1
                if on_failure is not None:
                    on_failure()
                log.warning("background %s failed", what, extra={"error": str(exc)[:200]})

        task = asyncio.create_task(guarded())  # copies the context: request id included
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace_seconds: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)


# ---- the HTTP side ---------------------------------------------------------------------------

def bearer_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise FederationError(
            ErrorCode.UNAUTHENTICATED,
            "Missing API key: send it as 'Authorization: Bearer <key>'",
        )
    return key.strip()


async def authenticate(request: web.Request, verifier: KeyVerifier, scope: str) -> KeyPrincipal:
    source = request.remote or ""
    return await verifier.verify(bearer_key(request), scope=scope, source=source)
