"""Two Wolves: disclosure by scope (Privacy Wolf) and the complete audit trail written
before any answer (Security Wolf)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from federation.council.events import prompt_sha256
from federation.council.scripted_backend import (
    CHAIR,
    Script,
    ScriptedCouncilBackend,
    vote_json,
)
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.inference.types import ChatMessage
from federation.memory.records import AuditEntry, MemoryRecord
from federation.memory.sink import AuditSink
from federation.v1 import council_pb2
from tests.council_support import CouncilStack, council_stack
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)

SCRIPTS = {
    "crawdad": Script([vote_json("reject", 0.7, "Secrets in env vars.", ["secrets in env"])]),
    "turtle": Script([vote_json("approve", 0.9, "Reversible.", ["needs a rollback drill"])]),
}


def as_gateway(scopes: str, request_id: str = "") -> tuple[tuple[str, str], ...]:
    pairs = [("x-federation-key-scopes", scopes)]
    if request_id:
        pairs.append(("x-request-id", request_id))
    return tuple(pairs)


async def vote(stack: CouncilStack, scopes: str, **fields: object) -> council_pb2.CouncilResult:
    stub = stack.stub("gateway")
    request = council_pb2.VoteUnaryRequest(question="Enable the vault?", **fields)  # type: ignore[arg-type]
    response = await stub.VoteUnary(request, metadata=as_gateway(scopes))
    return response.result


async def denied(stack: CouncilStack, scopes: str, **fields: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await vote(stack, scopes, **fields)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return caught.value.details() or ""


async def test_each_level_needs_its_scope_and_discloses_only_its_part(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts=SCRIPTS)
    async with council_stack(pki, database, backend) as stack:
        # Level 1: the answer only.
        one = await vote(stack, "council")
        assert one.answer and one.level == council_pb2.DISCLOSURE_LEVEL_ANSWER
        assert not one.members and not one.audit_sequences
        assert "needs the scope 'council'" in await denied(stack, "chat")

        # Level 2: stances, confidences, concerns; no rationale, latency or prompt hash.
        assert "'council:chiefs'" in await denied(stack, "council", level=2)
        assert "'council:chiefs'" in await denied(stack, "council,council:specialist", level=2)
        two = await vote(stack, "council,council:chiefs", level=2)
        crawdad = next(m for m in two.members if m.member == "crawdad")
        assert (crawdad.stance, crawdad.confidence) == (council_pb2.STANCE_REJECT, 0.7)
        assert list(crawdad.concerns) == ["secrets in env"]
        assert crawdad.display_name == "Crawdad" and crawdad.specialty == "security"
        assert all(not m.rationale and not m.prompt_sha256 and not m.HasField("latency")
                   for m in two.members)
        assert len(two.members) == 7

        # Level 3: one specialty's full record.
        assert "'council:specialist'" in await denied(stack, "council,council:chiefs", level=3,
                                                      specialty="security")
        three = await vote(stack, "council,council:specialist", level=3,
                           specialty="sustainability")
        full = {m.member for m in three.members if m.rationale}
        assert full == {"turtle"}
        turtle = next(m for m in three.members if m.member == "turtle")
        assert turtle.rationale == "Reversible." and len(turtle.prompt_sha256) == 64
        assert turtle.HasField("latency")
        by_name = await vote(stack, "council,council:specialist", level=3, specialty="Crawdad")
        assert {m.member for m in by_name.members if m.rationale} == {"crawdad"}

        # Level 4: everything, and where the audit trail is.
        assert "'memory:audit'" in await denied(stack, "council,council:specialist", level=4)
        four_response = await stack.stub("gateway").VoteUnary(
            council_pb2.VoteUnaryRequest(question="Enable the vault?", level=4),
            metadata=as_gateway("council,memory:audit", "req-level4"))
        four = four_response.result
        assert all(m.rationale and m.prompt_sha256 for m in four.members)
        trail = await stack.store.trail("req-level4")
        assert list(four.audit_sequences) == [r.sequence for r in trail]


async def test_streamed_votes_follow_the_level_too(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend(scripts=SCRIPTS)
    async with council_stack(pki, database, backend) as stack:
        call = stack.stub("gateway").Vote(
            council_pb2.VoteRequest(question="Enable the vault?", level=3,
                                    specialty="security"),
            metadata=as_gateway("council,council:specialist"))
        voted = [e.member_voted for e in [e async for e in call] if e.HasField("member_voted")]
    assert len(voted) == 7 and all(v.HasField("vote") for v in voted)
    assert {v.member for v in voted if v.vote.rationale} == {"crawdad"}


async def test_scopes_metadata_is_only_trusted_from_the_gateway(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend) as stack:
        # The operator holds every scope, with or without metadata.
        admin = await stack.stub("admin").VoteUnary(
            council_pb2.VoteUnaryRequest(question="q?", level=4))
        assert admin.result.members
        # The gateway without the header acts with no scope at all.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub("gateway").VoteUnary(council_pb2.VoteUnaryRequest(question="q?"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Sending it twice is ambiguous: refused.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub("gateway").VoteUnary(
                council_pb2.VoteUnaryRequest(question="q?"),
                metadata=(("x-federation-key-scopes", "council"),
                          ("x-federation-key-scopes", "memory:audit")))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Other roles may not call the council at all (authorization table).
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub("inference").VoteUnary(council_pb2.VoteUnaryRequest(question="q?"),
                                                    metadata=as_gateway("council"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert backend.calls.get(CHAIR) == 1  # only the admin's vote ran


# ---- the audit trail ---------------------------------------------------------------------------

class SlowSink:
    """Delays every write: an answer sent before its writes commit would show up here."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner
        self.committed = 0

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        await asyncio.sleep(0.15)
        record = await self.inner.record(entry)
        self.committed += 1
        return record


class FailingSink:
    """Fails the synthesis record: the last write before the answer."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        if entry.action == "council.synthesis":
            raise FederationError(ErrorCode.UNAVAILABLE, "thermal memory is down")
        return await self.inner.record(entry)


async def test_the_complete_trail_is_committed_before_the_answer(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts={
        **SCRIPTS, "gecko": Script(["not json", vote_json("approve", 0.6)])})
    async with council_stack(pki, database, backend, sink_wrapper=SlowSink) as stack:
        call = stack.stub().Vote(council_pb2.VoteRequest(question="Enable the vault?",
                                                         tenant_id="t9", rounds=2),
                                 metadata=(("x-request-id", "req-trail"),))
        async for event in call:
            if event.HasField("result"):
                # Read the trail the moment the answer arrives, before anything else.
                trail = await stack.store.trail("req-trail")
                result = event.result
    actions = [r.action for r in trail]
    assert actions == (["council.request"] + ["council.vote"] * 14 + ["council.synthesis"])
    assert {r.request_id for r in trail} == {"req-trail"} and {r.tenant_id for r in trail} == {
        "t9"}
    assert [int(r.attributes["round"]) for r in trail[1:-1]] == [1] * 7 + [2] * 7
    request = json.loads(trail[0].body)
    assert request["question"] == "Enable the vault?" and len(request["members"]) == 7
    for record in trail[1:-1]:
        body = json.loads(record.body)
        last = body["attempts"][-1]
        messages = [(m["role"], m["content"]) for m in last["messages"]]
        assert record.attributes["prompt_sha256"] == last["prompt_sha256"]
        assert last["prompt_sha256"] == prompt_sha256([ChatMessage(r, c) for r, c in messages])
        assert last["output"] and float(record.attributes["latency_ms"]) >= 0
    gecko = json.loads(next(r.body for r in trail if r.subject == "gecko"
                            and r.attributes["round"] == "1"))
    assert gecko["attempts"][0]["output"] == "not json"
    synthesis = json.loads(trail[-1].body)
    chair_input = synthesis["chair"]["attempts"][0]["messages"]
    assert "Enable the vault?" in chair_input[-1]["content"]
    assert synthesis["chair"]["attempts"][0]["output"]
    assert synthesis["result"]["answer"] == result.answer
    assert synthesis["result"]["quorum"]["voted"] == 7


async def test_a_failed_audit_write_fails_the_call(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend, sink_wrapper=FailingSink) as stack:
        call = stack.stub().Vote(council_pb2.VoteRequest(question="Proceed?"))
        seen: list[str] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in call:
                seen.append(str(event.WhichOneof("event")))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not record its deliberation" in (caught.value.details() or "")
    assert "result" not in seen


async def test_thermal_memory_down_fails_the_call(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend) as stack:
        await stack.memory_server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(question="Proceed?"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not record its deliberation" in (caught.value.details() or "")
