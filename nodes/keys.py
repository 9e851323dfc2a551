"""KeyAuthorityService: a thin adapter over :mod:`federation.keys`.

Audit records go to the memory node through ``runtime.peer_channel("memory")``.
Key-id based calls are open to any tenant for the roles the authorization
table lets in (``admin`` for management, ``gateway`` for verify and quotas):
the gateway acts for whichever tenant owns the presented key.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeAlias

import grpc

from federation.errors import ErrorCode, FederationError
from federation.interceptor import current_caller
from federation.keys.authority import KeyAuthority
from federation.keys.convert import (
    issue_request_from_proto,
    key_to_proto,
    quota_to_proto,
    sample_to_proto,
)
from federation.keys.decay import strength_decay_job
from federation.keys.leases import LeaseRequest, LeaseService
from federation.keys.quota import QuotaService
from federation.memory.client import GrpcAuditSink
from federation.periodic import PeriodicTask
from federation.prototime import duration, timestamp, to_seconds
from federation.server import ServiceRegistration
from federation.v1 import key_authority_pb2 as pb
from federation.v1 import key_authority_pb2_grpc as pb_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KeyAuthorityService"].full_name
_ANY_TENANT_ROLES = frozenset({"admin", "gateway"})
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

def caller_tenant_scope() -> None:
    """Key-id calls act for any tenant, but only for roles trusted to do so."""
    role = current_caller().role
    if role not in _ANY_TENANT_ROLES:
        raise FederationError(ErrorCode.PERMISSION_DENIED, f"role {role!r} may not manage keys")


class KeyAuthorityServicer(pb_grpc.KeyAuthorityServiceServicer):
    def __init__(self, authority: KeyAuthority, quotas: QuotaService,
                 leases: LeaseService) -> None:
        self._keys = authority
        self._quotas = quotas
        self._leases = leases

    async def IssueKey(self, request: pb.IssueKeyRequest, context: Context) -> pb.IssueKeyResponse:
        caller_tenant_scope()
        issued = await self._keys.issue(issue_request_from_proto(request),
                                        actor=current_caller().spiffe_id)
        return pb.IssueKeyResponse(key=key_to_proto(issued.view), secret=issued.secret)

    async def VerifyKey(
        self, request: pb.VerifyKeyRequest, context: Context
    ) -> pb.VerifyKeyResponse:
        source = request.source or current_caller().spiffe_id
        view = await self._keys.verify(request.key, source, request.required_scope)
        return pb.VerifyKeyResponse(key=key_to_proto(view), strength=view.strength)

    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: Context
    ) -> pb.RevokeKeyResponse:
        caller_tenant_scope()
        view = await self._keys.revoke(request.key_id, None, current_caller().spiffe_id,
                                       request.reason)
        return pb.RevokeKeyResponse(key=key_to_proto(view))

    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: Context
    ) -> pb.RotateKeyResponse:
        caller_tenant_scope()
        grace = to_seconds(request.grace_period) if request.HasField("grace_period") else 0.0
        rotated = await self._keys.rotate(request.key_id, None, current_caller().spiffe_id,
                                          grace)
        response = pb.RotateKeyResponse(key=key_to_proto(rotated.view), secret=rotated.secret)
        if rotated.old_secret_expires_at is not None:
            response.old_secret_expires_at.CopyFrom(timestamp(rotated.old_secret_expires_at))
        return response

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        caller_tenant_scope()
        page = await self._keys.list_keys(
            request.tenant_id, include_revoked=request.include_revoked,
            page_size=request.page_size, page_token=request.page_token,
        )
        return pb.ListKeysResponse(keys=[key_to_proto(v) for v in page.items],
                                   next_page_token=page.next_page_token)

    async def GetKeyStrengthHistory(
        self, request: pb.GetKeyStrengthHistoryRequest, context: Context
    ) -> pb.GetKeyStrengthHistoryResponse:
        caller_tenant_scope()
        page = await self._keys.history(request.key_id, None, page_size=request.page_size,
                                        page_token=request.page_token)
        return pb.GetKeyStrengthHistoryResponse(
            samples=[sample_to_proto(sample) for sample in page.items],
            next_page_token=page.next_page_token)

    async def CheckQuota(
        self, request: pb.CheckQuotaRequest, context: Context
    ) -> pb.CheckQuotaResponse:
        caller_tenant_scope()
        allowed, status = await self._quotas.check(
            request.key_id, None, tokens=request.tokens, is_request=request.is_request)
        return pb.CheckQuotaResponse(allowed=allowed, status=quota_to_proto(status))

    async def ConsumeQuota(
        self, request: pb.ConsumeQuotaRequest, context: Context
    ) -> pb.ConsumeQuotaResponse:
        caller_tenant_scope()
        status = await self._quotas.consume(
            request.key_id, None, tokens=request.tokens, is_request=request.is_request,
            actor=current_caller().spiffe_id)
        return pb.ConsumeQuotaResponse(status=quota_to_proto(status))

    async def ReserveQuota(
        self, request: pb.ReserveQuotaRequest, context: Context
    ) -> pb.ReserveQuotaResponse:
        caller_tenant_scope()
        reservation = await self._quotas.reserve(
            request.key_id, None, tokens=request.tokens, min_tokens=request.min_tokens,
            actor=current_caller().spiffe_id)
        response = pb.ReserveQuotaResponse(
            reservation_id=reservation.reservation_id, reserved_tokens=reservation.tokens,
            status=quota_to_proto(reservation.status))
        if reservation.limited:
            response.token_budget = reservation.tokens
        return response

    async def SettleQuota(
        self, request: pb.SettleQuotaRequest, context: Context
    ) -> pb.SettleQuotaResponse:
        caller_tenant_scope()
        settlement = await self._quotas.settle(request.key_id, request.reservation_id,
                                               used_tokens=request.used_tokens)
        return pb.SettleQuotaResponse(settled=settlement.settled,
                                      released_tokens=settlement.released)

    async def GrantQuotaLease(
        self, request: pb.GrantQuotaLeaseRequest, context: Context
    ) -> pb.GrantQuotaLeaseResponse:
        caller_tenant_scope()
        lease = await self._leases.grant(
            request.key_id, None,
            LeaseRequest(requests=request.requests, tokens=request.tokens,
                         need_tokens=request.need_tokens, min_tokens=request.min_tokens),
            actor=current_caller().spiffe_id)
        return pb.GrantQuotaLeaseResponse(
            lease_id=lease.lease_id, requests=lease.requests, tokens=lease.tokens,
            limited=lease.limited, valid_for=duration(lease.valid_seconds),
            status=quota_to_proto(lease.status))

    async def SettleQuotaLease(
        self, request: pb.SettleQuotaLeaseRequest, context: Context
    ) -> pb.SettleQuotaLeaseResponse:
        caller_tenant_scope()
        settlement = await self._leases.settle(
            request.key_id, request.lease_id, used_tokens=request.used_tokens,
            used_requests=request.used_requests)
        return pb.SettleQuotaLeaseResponse(
            settled=settlement.settled, released_tokens=settlement.released_tokens,
            released_requests=settlement.released_requests)


def unsettled_reservation_purge(quotas: QuotaService, seconds: float) -> PeriodicTask:
    """Forget, every ``seconds``, reservations left unsettled for longer than that."""
    async def run() -> int:
        return await quotas.purge_unsettled(dt.timedelta(seconds=seconds))

    return PeriodicTask("quota-reservation-purge", seconds, run)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    settings = runtime.settings
    pool = runtime.require_database().pool
    audit = GrpcAuditSink(runtime.peer_channel("memory"),
                          timeout_seconds=settings.grpc.call_timeout_seconds)
    authority = KeyAuthority(pool, settings.keys, audit)
    await authority.start()
    runtime.cleanup.push_async_callback(authority.stop)
    decay = strength_decay_job(authority, pool, settings.keys.decay_interval_seconds)
    await decay.start()
    runtime.cleanup.push_async_callback(decay.stop)
    quotas = QuotaService(pool, audit)
    purge = unsettled_reservation_purge(quotas, settings.keys.unsettled_reservation_seconds)
    await purge.start()
    runtime.cleanup.push_async_callback(purge.stop)
    leases = LeaseService(pool, quotas, max_seconds=settings.keys.lease_seconds,
                          max_fraction=settings.keys.lease_max_fraction)
    return ServiceRegistration.of(SERVICE_NAME, pb_grpc.add_KeyAuthorityServiceServicer_to_server,
                                  KeyAuthorityServicer(authority, quotas, leases))
