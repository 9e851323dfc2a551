"""CouncilService: a thin adapter over :class:`federation.council.engine.Council`.

The servicer converts messages, resolves what the caller may see, and
delegates. Disclosure is decided from the caller's scopes: an operator
(``admin`` role) holds every scope; the gateway passes the scopes of the API
key it verified in ``x-federation-key-scopes`` metadata; no other role may
consult the council (the authorization table already refuses them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from federation.council.convert import VoteRequestPb, event_to_pb, request_from_pb, result_to_pb
from federation.council.disclosure import (
    LEVEL_SCOPES,
    SCOPES_METADATA,
    Disclosure,
    level_from_int,
    resolve,
)
from federation.council.engine import Council
from federation.council.events import CouncilRequest
from federation.council.members import load_roster, members_file_for
from federation.errors import ErrorCode, FederationError
from federation.inference.client import InferenceRouter
from federation.interceptor import current_caller
from federation.logs import new_request_id, request_id_var
from federation.memory.client import GrpcAuditSink
from federation.memory.sink import AuditSink
from federation.server import ServiceRegistration
from federation.v1 import council_pb2, council_pb2_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = council_pb2.DESCRIPTOR.services_by_name["CouncilService"].full_name
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

ALL_SCOPES = frozenset({"council", *LEVEL_SCOPES.values()})


def granted_scopes(context: Context) -> frozenset[str]:
    """The scopes the current call acts with (see the module docstring)."""
    role = current_caller().role
    if role == "admin":
        return ALL_SCOPES
    if role == "gateway":
        values = [str(v) for k, v in context.invocation_metadata() or () if k == SCOPES_METADATA]
        if len(values) > 1:
            raise FederationError(ErrorCode.PERMISSION_DENIED,
                                  f"{SCOPES_METADATA} must be sent once")
        return frozenset(s.strip() for s in (values[0] if values else "").split(",") if s.strip())
    return frozenset()


class CouncilServicer(council_pb2_grpc.CouncilServiceServicer):
    def __init__(self, council: Council) -> None:
        self._council = council

    def _prepare(self, request: VoteRequestPb, context: Context
                 ) -> tuple[CouncilRequest, Disclosure]:
        disclosure = resolve(level_from_int(request.level), request.specialty,
                             granted_scopes(context), self._council.roster)
        domain = request_from_pb(request, request_id_var.get() or new_request_id())
        self._council.validate(domain)  # refuse before the stream starts
        return domain, disclosure

    async def Vote(  # type: ignore[override]
        self, request: council_pb2.VoteRequest, context: Context
    ) -> AsyncIterator[council_pb2.VoteResponse]:
        domain, disclosure = self._prepare(request, context)
        events = self._council.deliberate(domain)
        try:
            async for event in events:
                yield event_to_pb(event, disclosure)
        finally:
            await events.aclose()

    async def VoteUnary(
        self, request: council_pb2.VoteUnaryRequest, context: Context
    ) -> council_pb2.VoteUnaryResponse:
        domain, disclosure = self._prepare(request, context)
        outcome = await self._council.decide(domain)
        return council_pb2.VoteUnaryResponse(result=result_to_pb(outcome, disclosure))


def registration(servicer: CouncilServicer) -> ServiceRegistration:
    return ServiceRegistration.of(
        SERVICE_NAME, council_pb2_grpc.add_CouncilServiceServicer_to_server, servicer)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    settings = runtime.settings
    roster = load_roster(members_file_for(settings.home, settings.council.members_file))
    router = InferenceRouter(
        settings.peers.addresses("inference"), runtime.credentials, settings.grpc,
        refresh_seconds=settings.gateway.route_refresh_seconds,
        attempts=settings.gateway.route_attempts,
        probe_timeouts_to_down=settings.gateway.route_probe_timeouts_to_down,
    )
    runtime.cleanup.push_async_callback(router.stop)
    await router.start()
    sink: AuditSink = GrpcAuditSink(runtime.peer_channel("memory"),
                                    timeout_seconds=settings.grpc.call_timeout_seconds)
    return registration(CouncilServicer(Council(roster, router, sink, settings.council)))
