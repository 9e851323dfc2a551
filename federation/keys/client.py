"""The client of the key authority, as the gateway uses it.

:class:`KeyVerifier` is the protocol the gateway depends on (verify a presented
key; reserve tokens against its quota before a generation and settle them
after); :class:`GrpcKeyVerifier` is the production implementation over mTLS
gRPC. Failures come back as the :class:`FederationError` the node raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from federation.errors import FederationError, from_rpc_error
from federation.prototime import to_datetime, to_seconds
from federation.v1 import key_authority_pb2, key_authority_pb2_grpc


@dataclass(frozen=True)
class KeyPrincipal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class KeyReservation:
    """Tokens reserved against a key's quota before a generation, settled after it."""

    key_id: str
    reservation_id: str
    tokens: int
    token_budget: int | None
    """What the generation may use, prompt and completion together (the inference node
    enforces it); ``None`` when the key has no token quota."""
    period_end: float | None = None
    """When the key's token quota period ends (``time.time()`` scale)."""
    leased: bool = False
    """Drawn from the gateway's lease of the key's budget (``reservation_id`` names the
    draw): it is settled in the gateway, into the lease, not with ``SettleQuota``."""

    def retry_after(self) -> float | None:
        """Seconds until the token quota period resets, if the key has one."""
        return None if self.period_end is None else max(1.0, self.period_end - time.time())


class KeyVerifier(Protocol):
    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        """The key's principal; FederationError UNAUTHENTICATED / PERMISSION_DENIED."""

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
        """Count the request and reserve up to ``tokens`` (capped to what remains).

        FederationError RESOURCE_EXHAUSTED (request rate) or INSUFFICIENT_QUOTA (fewer
        than ``min_tokens`` left), with retry_after_seconds; nothing is charged then.
        """

    async def settle(self, reservation: KeyReservation, used_tokens: int) -> None:
        """Charge what the request used and release the rest; idempotent."""


@dataclass(frozen=True)
class GrantedLease:
    """A lease of a key's budget, as the key authority granted it."""

    key_id: str
    lease_id: str
    requests: int
    tokens: int
    limited: bool
    """The key has a token quota: a draw is its generation's token budget."""
    valid_seconds: float
    """From the moment the grant was asked for."""
    period_end: float | None
    """When the key's token quota period ends (``time.time()`` scale)."""


class QuotaLeaser(Protocol):
    async def grant_lease(self, key_id: str, *, requests: int, tokens: int, need_tokens: int,
                          min_tokens: int) -> GrantedLease:
        """A lease, or FederationError as :meth:`KeyVerifier.reserve` refuses."""

    async def settle_lease(self, key_id: str, lease_id: str, *, used_tokens: int,
                           used_requests: int) -> None:
        """Charge what a lease's requests used and give back the rest; idempotent."""


def _refusal(exc: grpc.aio.AioRpcError) -> FederationError:
    error = from_rpc_error(exc)
    if error.spec.http_status == 429 and error.retry_after_seconds is None:
        error.retry_after_seconds = 1.0
    return error


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

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
        try:
            response = await self._stub.ReserveQuota(
                key_authority_pb2.ReserveQuotaRequest(
                    key_id=key_id, tokens=tokens, min_tokens=min_tokens),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        return KeyReservation(
            key_id, response.reservation_id, response.reserved_tokens,
            response.token_budget if response.HasField("token_budget") else None,
            _period_end(response.status),
        )

    async def settle(self, reservation: KeyReservation, used_tokens: int) -> None:
        try:
            await self._stub.SettleQuota(
                key_authority_pb2.SettleQuotaRequest(
                    key_id=reservation.key_id, reservation_id=reservation.reservation_id,
                    used_tokens=used_tokens),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def grant_lease(self, key_id: str, *, requests: int, tokens: int, need_tokens: int,
                          min_tokens: int) -> GrantedLease:
        try:
            response = await self._stub.GrantQuotaLease(
                key_authority_pb2.GrantQuotaLeaseRequest(
                    key_id=key_id, requests=requests, tokens=tokens, need_tokens=need_tokens,
                    min_tokens=min_tokens),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        return GrantedLease(key_id, response.lease_id, response.requests, response.tokens,
                            response.limited, to_seconds(response.valid_for),
                            _period_end(response.status))

    async def settle_lease(self, key_id: str, lease_id: str, *, used_tokens: int,
                           used_requests: int) -> None:
        try:
            await self._stub.SettleQuotaLease(
                key_authority_pb2.SettleQuotaLeaseRequest(
                    key_id=key_id, lease_id=lease_id, used_tokens=used_tokens,
                    used_requests=used_requests),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


def _period_end(status: key_authority_pb2.QuotaStatus) -> float | None:
    return (to_datetime(status.period_end_time).timestamp()
            if status.HasField("period_end_time") else None)
