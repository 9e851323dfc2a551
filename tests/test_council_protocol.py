"""The council protocol through the whole stack: scripted members on a real inference
node, the gateway's router, mTLS gRPC, thermal memory on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from federation.config import CouncilConfig
from federation.council.events import prompt_sha256
from federation.council.scripted_backend import (
    CHAIR,
    HANG,
    Script,
    ScriptedCouncilBackend,
    busy,
    synthesis_json,
    vote_json,
)
from federation.db import Database
from federation.inference.types import ChatMessage
from federation.v1 import council_pb2
from tests.council_support import council_stack
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)


def seconds(value: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def collect(stub: object, request: council_pb2.VoteRequest,
                  metadata: tuple[tuple[str, str], ...] = ()
                  ) -> list[council_pb2.VoteResponse]:
    call = stub.Vote(request, metadata=metadata)  # type: ignore[attr-defined]
    return [event async for event in call]


def kinds(events: list[council_pb2.VoteResponse]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


async def test_full_council_streams_progress_then_an_authorized_result(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts={
        "crawdad": Script([vote_json("approve", 0.9, concerns=["rotate keys"])], 0.02),
        "spider": Script([vote_json("approve", 0.8, concerns=["rotate keys", "schema drift"])]),
    })
    async with council_stack(pki, database, backend) as stack:
        events = await collect(stack.stub(), council_pb2.VoteRequest(
            question="Should we deploy to production?", tenant_id="t1"))
    assert kinds(events)[:7] == ["member_started"] * 7
    assert kinds(events)[7:14] == ["member_voted"] * 7
    assert kinds(events)[14:] == ["synthesis_started", "result"]
    assert events[-1].result.quorum.asked == 7
    result = events[-1].result
    assert result.decision == council_pb2.DECISION_AUTHORIZED
    assert result.confidence == pytest.approx((0.9 * 6.5 + 0.8) / 7.5)
    assert result.quorum.asked == 7 and result.quorum.voted == 7 and result.quorum.required == 5
    assert not result.quorum.missing and not result.fallback_synthesis
    assert result.answer == "Proceed."
    assert result.request_id.startswith("req_")
    assert result.level == council_pb2.DISCLOSURE_LEVEL_ANSWER and not result.members
    assert result.usage.total_tokens > 0
    # At level 1 the progress events do not reveal votes either.
    assert not any(e.member_voted.HasField("vote") for e in events if e.HasField("member_voted"))
    # The chair saw every vote, named, and the tally.
    chair_prompt = next(r for k, r in backend.requests if k == CHAIR).messages[-1].content
    assert "Crawdad" in chair_prompt and "The weighted tally supports: authorized" in chair_prompt


async def test_quorum_missed_is_unavailable_naming_the_missing(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts={
        "gecko": Script([busy()]), "turtle": Script([busy()]), "raven": Script(["no json"]),
    })
    async with council_stack(pki, database, backend) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stack.stub(), council_pb2.VoteRequest(question="Ship it?"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "4 of 7 members voted, 5 required" in details
    assert "Gecko (resource_exhausted)" in details and "Turtle (resource_exhausted)" in details
    assert "Raven (unparseable)" in details


async def test_quorum_missed_is_audited(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend(scripts={k: Script([busy()]) for k in
                                              ("gecko", "turtle", "raven")})
    async with council_stack(pki, database, backend) as stack:
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(stack.stub(), council_pb2.VoteRequest(question="Ship it?"),
                          metadata=(("x-request-id", "req-quorum"),))
        trail = await stack.store.trail("req-quorum")
    assert trail[0].action == "council.request"
    assert trail[-1].action == "council.unavailable"
    assert len([r for r in trail if r.action == "council.vote"]) == 7


async def test_a_sub_council_scales_the_quorum(pki: TestPKI, database: Database) -> None:
    scripts: dict[str, Script] = {}
    backend = ScriptedCouncilBackend(scripts=scripts)
    async with council_stack(pki, database, backend) as stack:
        result = (await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
            question="Add a cache?", council="technical", level=2), timeout=20)).result
        scripts["eagle_eye"] = Script([busy()])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
                question="Add a cache?", council="technical"))
    assert result.quorum.asked == 2 and result.quorum.required == 2
    assert [m.member for m in result.members] == ["gecko", "eagle_eye"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "1 of 2 members voted, 2 required" in (caught.value.details() or "")
    assert "Eagle Eye (resource_exhausted)" in (caught.value.details() or "")


async def test_a_member_timing_out_is_reported_and_does_not_hold_the_council(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts={"spider": Script([HANG])})
    async with council_stack(pki, database, backend) as stack:
        started = time.perf_counter()
        events = await collect(stack.stub(), council_pb2.VoteRequest(
            question="Deploy?", member_deadline=seconds(0.4)))
        elapsed = time.perf_counter() - started
    failed = [e.member_failed for e in events if e.HasField("member_failed")]
    assert [(f.member, f.reason) for f in failed] == [("spider", "deadline")]
    result = events[-1].result
    assert result.quorum.voted == 6
    assert [(m.member, m.reason) for m in result.quorum.missing] == [("spider", "deadline")]
    assert elapsed < 3


async def test_malformed_output_gets_one_repair_attempt(pki: TestPKI, database: Database
                                                        ) -> None:
    backend = ScriptedCouncilBackend(scripts={
        "gecko": Script(["I think this is fine!", vote_json("approve", 0.7)]),
        "turtle": Script(["{\"stance\": \"perhaps\"}", "still not a vote"]),
    })
    async with council_stack(pki, database, backend) as stack:
        events = await collect(stack.stub(), council_pb2.VoteRequest(
            question="Adopt the new schema?", level=4), metadata=(("x-request-id", "req-r"),))
        trail = await stack.store.trail("req-r")
    failed = {e.member_failed.member: e.member_failed.reason for e in events
              if e.HasField("member_failed")}
    assert failed == {"turtle": "unparseable"}
    result = events[-1].result
    gecko = next(m for m in result.members if m.member == "gecko")
    assert gecko.stance == council_pb2.STANCE_APPROVE and gecko.confidence == 0.7
    assert backend.calls["gecko"] == 2 and backend.calls["turtle"] == 2
    # The repair prompt quotes the parse error; the vote records the repaired prompt's hash.
    repair = [r for k, r in backend.requests if k == "gecko"][1]
    assert "no JSON object" in repair.messages[-1].content
    assert repair.messages[-2] == ChatMessage("assistant", "I think this is fine!")
    assert gecko.prompt_sha256 == prompt_sha256(repair.messages)
    gecko_record = next(r for r in trail if r.action == "council.vote" and r.subject == "gecko")
    body = json.loads(gecko_record.body)
    assert [a["output"] for a in body["attempts"]] == ["I think this is fine!",
                                                       vote_json("approve", 0.7)]
    assert body["attempts"][0]["error"] == "the reply contains no JSON object"


async def test_chair_failure_falls_back_to_the_weighted_majority(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(scripts={
        CHAIR: Script([busy()]),
        "crawdad": Script([vote_json("reject", 0.9, concerns=["keys in logs"])]),
        "turtle": Script([vote_json("reject", 0.9, concerns=["Keys in logs.", "irreversible"])]),
    })
    async with council_stack(pki, database, backend) as stack:
        result = (await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
            question="Log request bodies?"))).result
    assert result.fallback_synthesis
    assert result.answer.startswith("Fallback synthesis (the chair was unavailable)")
    # S = (5 * 0.9 - 2 * 1.25 * 0.9) / 7.5 = 0.3 -> needs review
    assert result.decision == council_pb2.DECISION_NEEDS_REVIEW
    assert result.confidence == pytest.approx(0.3)
    assert list(result.concerns) == ["keys in logs", "irreversible"]


async def test_an_unparseable_chair_also_falls_back(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend(scripts={CHAIR: Script(["nope", "nope again"])})
    async with council_stack(pki, database, backend) as stack:
        result = (await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
            question="Proceed?"))).result
    assert result.fallback_synthesis and result.decision == council_pb2.DECISION_AUTHORIZED
    assert result.answer.startswith("Fallback synthesis (the chair's answer could not be used)")
    assert backend.calls[CHAIR] == 2


async def test_the_chair_cannot_overrule_the_votes(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend(
        default=Script([vote_json("reject", 0.9)]),
        scripts={CHAIR: Script([synthesis_json("Go ahead.", "authorized")])},
    )
    async with council_stack(pki, database, backend) as stack:
        result = (await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
            question="Proceed?"))).result
    assert result.decision == council_pb2.DECISION_NEEDS_REVIEW
    assert any("votes support blocked" in c for c in result.concerns)


async def test_a_deliberation_round_can_change_a_stance(pki: TestPKI, database: Database
                                                        ) -> None:
    backend = ScriptedCouncilBackend(scripts={
        "turtle": Script([vote_json("reject", 0.8, "Cannot be undone.", ["no rollback plan"]),
                          vote_json("approve", 0.6, "Rollback exists.", [])]),
        "crawdad": Script([vote_json("approve", 0.9, "Fine.", ["rollback tested weekly"])]),
    })
    async with council_stack(pki, database, backend) as stack:
        events = await collect(stack.stub(), council_pb2.VoteRequest(
            question="Migrate the database?", rounds=2, level=2))
    result = events[-1].result
    assert result.rounds == 2
    turtle = [(m.round, m.stance) for m in result.members if m.member == "turtle"]
    assert turtle == [(1, council_pb2.STANCE_REJECT), (2, council_pb2.STANCE_APPROVE)]
    assert len(result.members) == 14 and all(not m.rationale for m in result.members)
    rounds = [e.member_started.round for e in events if e.HasField("member_started")]
    assert rounds == [1] * 7 + [2] * 7
    # Round 2 shows the others' votes and concerns, anonymised.
    revise = [r for k, r in backend.requests if k == "turtle"][1].messages[-1].content
    # Labels are shuffled per request id; turtle may hold any of them, so six remain.
    assert len(re.findall(r"^- Member [A-G]: ", revise, re.MULTILINE)) == 6
    assert "rollback tested weekly" in revise
    assert "Crawdad" not in revise and "crawdad" not in revise
    assert "Your own round-1 vote: reject" in revise
    assert result.decision == council_pb2.DECISION_AUTHORIZED


async def test_overall_deadline_cuts_members_and_falls_back_for_the_chair(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(default=Script([vote_json()], 0.05),
                                     scripts={CHAIR: Script([HANG])})
    async with council_stack(pki, database, backend) as stack:
        started = time.perf_counter()
        result = (await stack.stub().VoteUnary(council_pb2.VoteUnaryRequest(
            question="Proceed?", overall_deadline=seconds(0.6)))).result
        elapsed = time.perf_counter() - started
    assert result.fallback_synthesis and result.quorum.voted == 7
    assert elapsed < 3


async def test_bad_requests_are_refused_before_any_work(pki: TestPKI, database: Database
                                                        ) -> None:
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend) as stack:
        for request, param in [
            (council_pb2.VoteRequest(question="  "), "question"),
            (council_pb2.VoteRequest(question="q", rounds=3), "rounds"),
            (council_pb2.VoteRequest(question="q", council="legal"), "unknown council"),
            (council_pb2.VoteRequest(question="q", quorum=8), "quorum"),
            (council_pb2.VoteRequest(question="q", level=3), "specialty"),
            (council_pb2.VoteRequest(question="q", level=3, specialty="legal"), "specialty"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stack.stub(), request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, param
            assert param in (caught.value.details() or ""), caught.value.details()
    assert backend.requests == []


async def test_concurrent_votes_do_not_mix(pki: TestPKI, database: Database) -> None:
    backend = ScriptedCouncilBackend(default=Script([vote_json()], 0.02))
    async with council_stack(pki, database, backend) as stack:
        stub = stack.stub()
        results = await asyncio.gather(*(
            stub.VoteUnary(council_pb2.VoteUnaryRequest(question=f"Question {i}?"),
                           metadata=(("x-request-id", f"req-c{i}"),)) for i in range(4)))
        trails = [await stack.store.trail(f"req-c{i}") for i in range(4)]
    assert [r.result.request_id for r in results] == [f"req-c{i}" for i in range(4)]
    for i, trail in enumerate(trails):
        assert len(trail) == 9
        assert json.loads(trail[0].body)["question"] == f"Question {i}?"


# Deadlines far beyond the test's patience: only the cancellation can stop the members.
LONG = {"member_deadline": seconds(300), "overall_deadline": seconds(600)}
PATIENT = CouncilConfig(member_deadline_seconds=300, overall_deadline_seconds=600,
                        synthesis_deadline_seconds=5)
"""A node whose settings allow :data:`LONG` (a request may not exceed them)."""


async def wait_until_idle(backend: ScriptedCouncilBackend, seconds: float = 2.0) -> None:
    async with asyncio.timeout(seconds):
        while backend.in_flight:  # noqa: ASYNC110 - the backend has no event to await
            await asyncio.sleep(0.01)


async def test_a_client_that_cancels_stops_every_member_call(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(default=Script([HANG]))
    async with council_stack(pki, database, backend, config=PATIENT) as stack:
        call = stack.stub().Vote(council_pb2.VoteRequest(question="Hang on?", **LONG))
        started = 0
        async for event in call:
            started += event.HasField("member_started")
            if started == 7:
                break
        async with asyncio.timeout(5):  # every member's generation has reached the model
            while backend.in_flight < 7:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        call.cancel()
        await wait_until_idle(backend)  # the inference node saw each call cancelled
        assert sum(backend.calls.values()) == 7  # and nothing was retried elsewhere


async def test_a_unary_caller_whose_deadline_passes_stops_the_members(
    pki: TestPKI, database: Database
) -> None:
    backend = ScriptedCouncilBackend(default=Script([HANG]))
    async with council_stack(pki, database, backend, config=PATIENT) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub().VoteUnary(
                council_pb2.VoteUnaryRequest(question="Hang on?", **LONG), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until_idle(backend)
        assert sum(backend.calls.values()) == 7


@pytest.mark.parametrize("field, value, message", [
    ("member_deadline", Duration(seconds=6), "member_deadline may be at most 5 s here"),
    ("overall_deadline", Duration(seconds=21), "overall_deadline may be at most 20 s here"),
    ("overall_deadline", Duration(seconds=1, nanos=-5), "not a well-formed duration"),
    ("member_deadline", Duration(seconds=10**12), "not a well-formed duration"),
])
async def test_deadlines_beyond_the_nodes_settings_or_malformed_are_refused(
    pki: TestPKI, database: Database, field: str, value: Duration, message: str
) -> None:
    # A request could ask for ~10**11 s per member, holding the node's slots past any
    # bound the operator set; a negative-nanos duration was taken as given.
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend) as stack:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub().VoteUnary(
                council_pb2.VoteUnaryRequest(question="Proceed?", **{field: value}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(caught.value.details())
    assert sum(backend.calls.values()) == 0


async def test_a_tenant_id_that_cannot_be_recorded_is_refused_before_any_work(
    pki: TestPKI, database: Database
) -> None:
    # Every audit record of a vote carries its tenant: one thermal memory refuses (a NUL)
    # used to run all seven members first and then fail as UNAVAILABLE ("could not
    # record"); one past the federation's tenant-id limit was recorded as given.
    backend = ScriptedCouncilBackend()
    async with council_stack(pki, database, backend) as stack:
        for tenant_id in ("t\x00", "t" * 201, " t1", "t\n1"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.stub().VoteUnary(
                    council_pb2.VoteUnaryRequest(question="Ship it?", tenant_id=tenant_id))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, tenant_id
            trailers = dict(caught.value.trailing_metadata() or ())
            assert trailers["error-param"] == "tenant_id"
        assert backend.requests == []
        result = await stack.stub().VoteUnary(
            council_pb2.VoteUnaryRequest(question="Ship it?", tenant_id="t1"))
    assert result.result.decision == council_pb2.DECISION_AUTHORIZED
