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
from google.protobuf.duration_pb2 import Duration

from federation.council.disclosure import (
    LEVEL_SCOPES,
    SCOPES_METADATA,
    Disclosure,
    audit_sequences,
    level_from_int,
    member_view,
    member_views,
    resolve,
)
from federation.council.engine import (
    Council,
    CouncilEvent,
    CouncilOutcome,
    CouncilRequest,
    MemberFailed,
    MemberStarted,
    MemberVoted,
    SynthesisStarted,
)
from federation.council.members import load_roster, members_file_for
from federation.council.votes import Decision, Stance
from federation.errors import ErrorCode, FederationError
from federation.inference.client import InferenceRouter
from federation.interceptor import current_caller
from federation.logs import new_request_id, request_id_var
from federation.memory.client import GrpcAuditSink
from federation.memory.sink import AuditSink
from federation.server import ServiceRegistration
from federation.v1 import common_pb2, council_pb2, council_pb2_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = council_pb2.DESCRIPTOR.services_by_name["CouncilService"].full_name
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
VoteRequestPb: TypeAlias = council_pb2.VoteRequest | council_pb2.VoteUnaryRequest

ALL_SCOPES = frozenset({"council", *LEVEL_SCOPES.values()})

_DECISIONS = {
    Decision.AUTHORIZED: council_pb2.DECISION_AUTHORIZED,
    Decision.BLOCKED: council_pb2.DECISION_BLOCKED,
    Decision.NEEDS_REVIEW: council_pb2.DECISION_NEEDS_REVIEW,
}
_STANCES = {
    Stance.APPROVE.value: council_pb2.STANCE_APPROVE,
    Stance.REJECT.value: council_pb2.STANCE_REJECT,
    Stance.ABSTAIN.value: council_pb2.STANCE_ABSTAIN,
}


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
        domain = CouncilRequest(
            question=request.question, request_id=request_id_var.get() or new_request_id(),
            tenant_id=request.tenant_id, council=request.council, rounds=request.rounds,
            member_deadline=_seconds(request, "member_deadline"),
            overall_deadline=_seconds(request, "overall_deadline"),
            quorum=request.quorum,
        )
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


def _seconds(request: VoteRequestPb, name: str) -> float | None:
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    value: Duration = getattr(request, name)
    return value.ToNanoseconds() / 1e9


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def event_to_pb(event: CouncilEvent, disclosure: Disclosure) -> council_pb2.VoteResponse:
    if isinstance(event, MemberStarted):
        return council_pb2.VoteResponse(member_started=council_pb2.MemberStarted(
            member=event.member.key, round=event.round))
    if isinstance(event, MemberVoted):
        record = event.record
        voted = council_pb2.MemberVoted(member=record.member.key, round=record.round)
        view = member_view(record, disclosure)
        if view is not None:
            voted.vote.CopyFrom(_vote_pb(view))
        return council_pb2.VoteResponse(member_voted=voted)
    if isinstance(event, MemberFailed):
        return council_pb2.VoteResponse(member_failed=council_pb2.MemberFailed(
            member=event.record.member.key, round=event.record.round,
            reason=event.record.failure))
    if isinstance(event, SynthesisStarted):
        return council_pb2.VoteResponse(synthesis_started=council_pb2.SynthesisStarted(
            vote_count=event.vote_count))
    return council_pb2.VoteResponse(result=result_to_pb(event, disclosure))


def _vote_pb(view: Any) -> council_pb2.MemberVote:
    vote = council_pb2.MemberVote(
        member=view.member, display_name=view.name, specialty=view.specialty,
        stance=_STANCES[view.stance], confidence=view.confidence,  # type: ignore[arg-type]
        concerns=list(view.concerns), round=view.round,
        rationale=view.rationale or "", prompt_sha256=view.prompt_sha256 or "",
    )
    if view.seconds is not None:
        vote.latency.CopyFrom(_duration(view.seconds))
    return vote


def result_to_pb(outcome: CouncilOutcome, disclosure: Disclosure) -> council_pb2.CouncilResult:
    tokens = outcome.prompt_tokens + outcome.completion_tokens
    return council_pb2.CouncilResult(
        request_id=outcome.request_id,
        answer=outcome.answer,
        decision=_DECISIONS[outcome.decision],  # type: ignore[arg-type]
        confidence=outcome.confidence,
        concerns=list(outcome.concerns),
        quorum=council_pb2.Quorum(
            asked=len(outcome.asked), voted=len(outcome.final_votes), required=outcome.required,
            missing=[council_pb2.MissingMember(member=m.member.key, reason=m.reason)
                     for m in outcome.missing],
        ),
        members=[_vote_pb(v) for v in member_views(outcome, disclosure)],
        fallback_synthesis=outcome.fallback,
        rounds=outcome.rounds,
        level=int(disclosure.level),  # type: ignore[arg-type]
        usage=common_pb2.Usage(prompt_tokens=outcome.prompt_tokens,
                               completion_tokens=outcome.completion_tokens,
                               total_tokens=tokens),
        audit_sequences=list(audit_sequences(outcome, disclosure)),
    )


def registration(servicer: CouncilServicer) -> ServiceRegistration:
    return ServiceRegistration(
        SERVICE_NAME,
        lambda server: council_pb2_grpc.add_CouncilServiceServicer_to_server(servicer, server),
    )


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    settings = runtime.settings
    roster = load_roster(members_file_for(settings.home, settings.council.members_file))
    router = InferenceRouter(
        settings.peers.addresses("inference"), runtime.credentials, settings.grpc,
        refresh_seconds=settings.gateway.route_refresh_seconds,
        attempts=settings.gateway.route_attempts,
    )
    runtime.cleanup.push_async_callback(router.stop)
    await router.start()
    sink: AuditSink = GrpcAuditSink(runtime.peer_channel("memory"),
                                    timeout_seconds=settings.grpc.call_timeout_seconds)
    return registration(CouncilServicer(Council(roster, router, sink, settings.council)))
