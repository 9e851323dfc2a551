"""GuardianService: share custody and audit checkpoints (issue #7).

A thin adapter: requests become calls on :class:`GuardianCustody` and
:class:`CheckpointLog` with the mTLS caller's identity; domain errors become
statuses in the shared interceptor. Key files (wrapping key, checkpoint
signing key) live under ``$FEDERATION_HOME/guardian/`` and are created 0600 on
first start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from federation.crypto.keyfile import load_or_create_key
from federation.errors import ErrorCode, FederationError
from federation.guardian.chain_links import MemoryChainLinks
from federation.guardian.checkpoints import CheckpointLog
from federation.guardian.convert import checkpoint_message, share_record
from federation.guardian.custody import GuardianCustody
from federation.interceptor import current_caller
from federation.memory.client import GrpcAuditSink
from federation.paging import page_size, sequence_token
from federation.server import ServiceRegistration
from federation.v1 import guardian_pb2, guardian_pb2_grpc
from nodes.runtime import NodeRuntime

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = "federation.v1.GuardianService"


class GuardianServicer(guardian_pb2_grpc.GuardianServiceServicer):
    def __init__(self, custody: GuardianCustody, checkpoints: CheckpointLog) -> None:
        self._custody = custody
        self._checkpoints = checkpoints

    async def DepositShare(
        self, request: guardian_pb2.DepositShareRequest, context: Context
    ) -> guardian_pb2.DepositShareResponse:
        info = await self._custody.deposit(
            current_caller(), tenant_id=request.tenant_id, object_id=request.object_id,
            key_id=request.key_id, share_index=request.share_index, share_text=request.share,
        )
        return guardian_pb2.DepositShareResponse(record=share_record(info))

    async def ReleaseShare(
        self, request: guardian_pb2.ReleaseShareRequest, context: Context
    ) -> guardian_pb2.ReleaseShareResponse:
        share, info = await self._custody.release(
            current_caller(), tenant_id=request.tenant_id, object_id=request.object_id,
            key_id=request.key_id, requested_by_key_id=request.requested_by_key_id,
            reason=request.reason,
        )
        return guardian_pb2.ReleaseShareResponse(share=share, record=share_record(info))

    async def DestroyShare(
        self, request: guardian_pb2.DestroyShareRequest, context: Context
    ) -> guardian_pb2.DestroyShareResponse:
        info = await self._custody.destroy(
            current_caller(), tenant_id=request.tenant_id, object_id=request.object_id,
            key_id=request.key_id, reason=request.reason,
        )
        return guardian_pb2.DestroyShareResponse(record=share_record(info))

    async def ListShares(
        self, request: guardian_pb2.ListSharesRequest, context: Context
    ) -> guardian_pb2.ListSharesResponse:
        page = await self._custody.list(request.tenant_id, request.page_size, request.page_token)
        return guardian_pb2.ListSharesResponse(
            shares=[share_record(s) for s in page.shares], next_page_token=page.next_page_token
        )

    async def SignCheckpoint(
        self, request: guardian_pb2.SignCheckpointRequest, context: Context
    ) -> guardian_pb2.SignCheckpointResponse:
        checkpoint = await self._checkpoints.sign(request.sequence, request.chain_head_hash)
        return guardian_pb2.SignCheckpointResponse(checkpoint=checkpoint_message(checkpoint))

    async def GetCheckpoint(
        self, request: guardian_pb2.GetCheckpointRequest, context: Context
    ) -> guardian_pb2.GetCheckpointResponse:
        if request.sequence < 0:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "sequence must not be negative",
                                  param="sequence")
        checkpoint = self._checkpoints.get(request.sequence)
        if checkpoint is None:
            raise FederationError(ErrorCode.NOT_FOUND, "no such checkpoint")
        return guardian_pb2.GetCheckpointResponse(checkpoint=checkpoint_message(checkpoint))

    async def ListCheckpoints(
        self, request: guardian_pb2.ListCheckpointsRequest, context: Context
    ) -> guardian_pb2.ListCheckpointsResponse:
        below = sequence_token(request.page_token) if request.page_token else None
        page, more = self._checkpoints.newest_below(below, page_size(request.page_size))
        token = str(page[-1].sequence) if more else ""
        return guardian_pb2.ListCheckpointsResponse(
            checkpoints=[checkpoint_message(c) for c in page], next_page_token=token
        )


def registration(servicer: GuardianServicer) -> ServiceRegistration:
    return ServiceRegistration.of(
        SERVICE_NAME, guardian_pb2_grpc.add_GuardianServiceServicer_to_server, servicer)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    settings = runtime.settings
    config = settings.guardian
    database = runtime.require_database()
    wrapping_key = load_or_create_key(settings.home / config.wrapping_key_file)
    checkpoints = CheckpointLog.open(
        settings.home / config.checkpoint_file, settings.home / config.signing_key_file,
        chain=MemoryChainLinks(runtime.peer_channel("memory"),
                               settings.grpc.call_timeout_seconds),
    )
    audit = GrpcAuditSink(
        runtime.peer_channel("memory"), timeout_seconds=settings.grpc.call_timeout_seconds
    )
    custody = GuardianCustody(database.pool, wrapping_key, audit, config)
    return registration(GuardianServicer(custody, checkpoints))
