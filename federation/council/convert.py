"""Council requests, events and results <-> protobuf, for the CouncilService servicer.

What a caller sees of each member's vote is decided by the disclosure level
(:mod:`federation.council.disclosure`) before it is converted here.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from google.protobuf.duration_pb2 import Duration

from federation.council.disclosure import Disclosure, audit_sequences, member_view, member_views
from federation.council.events import (
    CouncilEvent,
    CouncilOutcome,
    CouncilRequest,
    MemberFailed,
    MemberStarted,
    MemberVoted,
    SynthesisStarted,
)
from federation.council.votes import Decision, Stance
from federation.prototime import checked_seconds, duration
from federation.v1 import common_pb2, council_pb2

VoteRequestPb: TypeAlias = council_pb2.VoteRequest | council_pb2.VoteUnaryRequest

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


def request_from_pb(request: VoteRequestPb, request_id: str) -> CouncilRequest:
    return CouncilRequest(
        question=request.question, request_id=request_id,
        tenant_id=request.tenant_id, council=request.council, rounds=request.rounds,
        member_deadline=_seconds(request, "member_deadline"),
        overall_deadline=_seconds(request, "overall_deadline"),
        quorum=request.quorum,
    )


def _seconds(request: VoteRequestPb, name: str) -> float | None:
    if not request.HasField(name):  # type: ignore[arg-type]
        return None
    value: Duration = getattr(request, name)
    return checked_seconds(value, name)


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
        vote.latency.CopyFrom(duration(view.seconds))
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


