"""The client of the guardian, as the vault uses it.

:class:`GuardianClient` is the protocol the vault domain depends on;
:class:`GrpcGuardianClient` is the production implementation (a stub on an
mTLS channel carrying the gateway identity). Every failure to reach the
guardian becomes ``FederationError(UNAVAILABLE)`` with a message that names
the guardian, so the vault can fail closed with a clear 503.

"""

from __future__ import annotations

from typing import Protocol

import grpc

from federation.crypto.shares import MalformedShare, Share
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.v1 import guardian_pb2, guardian_pb2_grpc

_UNREACHABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED,
                          ErrorCode.CANCELLED})


class GuardianClient(Protocol):
    async def deposit(
        self, *, tenant_id: str, object_id: str, key_id: str, share: Share
    ) -> None: ...

    async def release(
        self, *, tenant_id: str, object_id: str, key_id: str, requested_by_key_id: str,
        reason: str,
    ) -> Share: ...

    async def destroy(
        self, *, tenant_id: str, object_id: str, key_id: str, reason: str
    ) -> None: ...


def guardian_error(exc: grpc.aio.AioRpcError) -> FederationError:
    error = from_rpc_error(exc)
    if error.code in _UNREACHABLE:
        return FederationError(
            ErrorCode.UNAVAILABLE,
            "the guardian is unavailable; vault creation and recovery need it "
            "(reads with the client share still work)",
            retry_after_seconds=error.retry_after_seconds or 5.0,
        )
    return error


class GrpcGuardianClient:
    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = guardian_pb2_grpc.GuardianServiceStub(channel)
        self._timeout = timeout

    async def deposit(self, *, tenant_id: str, object_id: str, key_id: str, share: Share) -> None:
        try:
            await self._stub.DepositShare(
                guardian_pb2.DepositShareRequest(
                    tenant_id=tenant_id, object_id=object_id, key_id=key_id,
                    share_index=share.index, share=share.encode(),
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise guardian_error(exc) from None

    async def release(
        self, *, tenant_id: str, object_id: str, key_id: str, requested_by_key_id: str,
        reason: str,
    ) -> Share:
        try:
            response = await self._stub.ReleaseShare(
                guardian_pb2.ReleaseShareRequest(
                    tenant_id=tenant_id, object_id=object_id, key_id=key_id,
                    requested_by_key_id=requested_by_key_id, reason=reason,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise guardian_error(exc) from None
        try:
            return Share.decode(response.share)
        except MalformedShare:
            raise FederationError(
                ErrorCode.DATA_LOSS, "the guardian returned a malformed share"
            ) from None

    async def destroy(self, *, tenant_id: str, object_id: str, key_id: str, reason: str) -> None:
        try:
            await self._stub.DestroyShare(
                guardian_pb2.DestroyShareRequest(
                    tenant_id=tenant_id, object_id=object_id, key_id=key_id, reason=reason,
                ),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise guardian_error(exc) from None
