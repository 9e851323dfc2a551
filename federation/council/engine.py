"""The council's protocol: fan-out, structured votes, deliberation, synthesis, audit.

:meth:`Council.deliberate` is an async iterator of progress events ending with
one :class:`CouncilOutcome`. Every model call goes through a
:class:`TextGenerator` — in production the :class:`~federation.inference.client.InferenceRouter`
the gateway uses, so members are spread over the inference nodes serving their
model, with the same failover. Nothing here knows gRPC or HTTP.

Failures are normal: each member has a per-round deadline (its one repair
attempt included) and the overall deadline caps it; a member that fails is
reported with a short reason (``deadline``, ``unparseable``, ``unavailable``, …).
The council answers when a quorum has voted, and raises UNAVAILABLE naming the
missing members otherwise. A chair that fails is replaced by the deterministic
fallback synthesis. No outcome is yielded before its audit trail is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import string
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from federation.config import CouncilConfig
from federation.council import audit as trail_actions
from federation.council.audit import AuditTrail
from federation.council.events import (
    Attempt,
    CouncilEvent,
    CouncilOutcome,
    CouncilRequest,
    MemberFailed,
    MemberRecord,
    MemberStarted,
    MemberVoted,
    Missing,
    SynthesisRecord,
    SynthesisStarted,
    TextGenerator,
    prompt_sha256,
)
from federation.council.members import Member, Roster
from federation.council.tally import (
    WeightedVote,
    council_confidence,
    fallback_synthesis,
    reconcile,
    support,
    tally_decision,
)
from federation.council.votes import (
    SYNTHESIS_SCHEMA,
    SYNTHESIS_SCHEMA_NAME,
    VOTE_SCHEMA,
    VOTE_SCHEMA_NAME,
    Decision,
    ParseError,
    Synthesis,
    Vote,
    parse_synthesis,
    parse_vote,
    schema_text,
)
from federation.errors import ErrorCode, FederationError
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    TokenDelta,
)
from federation.memory.sink import AuditSink
from federation.tenancy import checked_tenant_id

T = TypeVar("T")

MAX_QUESTION_CHARS = 4000
MAX_ROUNDS = 2
_FALLBACK_WHY = {
    "deadline": "the chair did not answer within the synthesis deadline",
    "unparseable": "the chair's answer could not be used",
}
"""What the fallback answer says happened to the chair, by ``SynthesisRecord.failure``;
any other failure is the chair's model being unavailable."""

log = logging.getLogger(__name__)


# ---- the council ------------------------------------------------------------------------

@dataclass
class _Run:
    request: CouncilRequest
    asked: tuple[Member, ...]
    rounds: int
    required: int
    member_deadline: float
    ends_at: float
    trail: AuditTrail
    clock: Callable[[], float]
    records: list[MemberRecord] = field(default_factory=list)

    def remaining(self) -> float:
        return self.ends_at - self.clock()


class Council:
    def __init__(
        self,
        roster: Roster,
        generator: TextGenerator,
        audit: AuditSink,
        config: CouncilConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roster = roster
        self._generator = generator
        self._audit = audit
        self._config = config
        self._clock = clock

    # -- entry points --------------------------------------------------------------------

    async def decide(self, request: CouncilRequest) -> CouncilOutcome:
        """Run a vote and return only the outcome."""
        events = self.deliberate(request)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, CouncilOutcome):
                    return event
        raise FederationError(ErrorCode.INTERNAL, "the council ended without an outcome")

    def validate(self, request: CouncilRequest) -> tuple[tuple[Member, ...], int, int]:
        """Asked members, rounds and required votes; INVALID_ARGUMENT when unusable.

        Called by :meth:`deliberate` before anything runs; transports may call it
        first to refuse a request before they start streaming.
        """
        if request.tenant_id:  # empty: an operator's vote, on no tenant's behalf
            # Every audit record of the vote carries it: one thermal memory cannot store
            # (a NUL, say) would fail the vote only after all its members had run.
            checked_tenant_id(request.tenant_id)
        question = request.question.strip()
        if not question:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "question must not be empty",
                                  param="question")
        if len(question) > MAX_QUESTION_CHARS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"question is longer than {MAX_QUESTION_CHARS} characters",
                                  param="question")
        rounds = request.rounds or self._config.rounds
        if not 1 <= rounds <= MAX_ROUNDS:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "rounds must be 1 or 2",
                                  param="rounds")
        asked = self.roster.select(request.council)
        if not asked:
            raise FederationError(ErrorCode.FAILED_PRECONDITION,
                                  f"council {request.council!r} has no members here",
                                  param="council")
        required = request.quorum or self.roster.required_votes(len(asked), self._config.quorum)
        if request.quorum and request.quorum > len(asked):
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"quorum {request.quorum} exceeds the {len(asked)} members "
                                  "asked", param="quorum")
        for name, value, limit in (
                ("member_deadline", request.member_deadline,
                 self._config.member_deadline_seconds),
                ("overall_deadline", request.overall_deadline,
                 self._config.overall_deadline_seconds)):
            if value is not None and value <= 0:
                raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{name} must be positive",
                                      param=name)
            # The node's settings are the operator's bound on what one vote may hold.
            if value is not None and value > limit:
                raise FederationError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{name} may be at most {limit:g} s here (council.{name}_seconds)",
                    param=name)
        return asked, rounds, required

    async def deliberate(self, request: CouncilRequest
                         ) -> AsyncGenerator[CouncilEvent, None]:
        asked, rounds, required = self.validate(request)
        overall = request.overall_deadline or self._config.overall_deadline_seconds
        run = _Run(
            request=request, asked=asked, rounds=rounds, required=required,
            member_deadline=request.member_deadline or self._config.member_deadline_seconds,
            ends_at=self._clock() + overall,
            trail=AuditTrail(self._audit, request_id=request.request_id,
                             tenant_id=request.tenant_id),
            clock=self._clock,
        )
        finished = False
        try:
            run.trail.write(trail_actions.ACTION_REQUEST, request.council or "full",
                            {"council": request.council or "full", "rounds": str(rounds),
                             "asked": str(len(asked)), "required": str(required)},
                            self._request_body(run))
            run.trail.next_stage()
            first_round = self._round(run, 1, asked, self._round1_messages_factory(run))
            async with contextlib.aclosing(first_round):  # closing us cancels the members
                async for event in first_round:
                    yield event
            first = {r.member.key: r for r in run.records if r.round == 1 and r.vote}
            await self._check_quorum(run, first)
            final = dict(first)
            if rounds == 2:
                run.trail.next_stage()
                voters = tuple(m for m in asked if m.key in first)
                revise = self._round2_messages_factory(run, first)
                second_round = self._round(run, 2, voters, revise)
                async with contextlib.aclosing(second_round):
                    async for event in second_round:
                        yield event
                final.update({r.member.key: r for r in run.records if r.round == 2 and r.vote})
            run.trail.next_stage()
            if run.trail.failed():
                raise trail_actions.audit_failed()
            final_votes = tuple(final[m.key] for m in asked if m.key in final)
            yield SynthesisStarted(len(final_votes))
            outcome = await self._synthesise(run, final_votes)
            sequences = await run.trail.close()
            finished = True
            yield _with_sequences(outcome, sequences)
        finally:
            if not finished:
                run.trail.detach()

    # -- rounds --------------------------------------------------------------------------

    async def _round(
        self, run: _Run, round_no: int, members: Sequence[Member],
        messages_for: Callable[[Member], tuple[ChatMessage, ...]],
    ) -> AsyncGenerator[CouncilEvent, None]:
        deadline = max(0.0, min(run.member_deadline, run.remaining()))
        tasks = [
            asyncio.create_task(self._ask_member(m, round_no, messages_for(m), deadline, run))
            for m in members
        ]
        try:
            for member in members:
                yield MemberStarted(member, round_no)
            for next_done in asyncio.as_completed(tasks):
                record = await next_done
                run.records.append(record)
                run.trail.write(trail_actions.ACTION_VOTE, record.member.key,
                                trail_actions.vote_attributes(record),
                                trail_actions.vote_body(record))
                yield MemberVoted(record) if record.vote else MemberFailed(record)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _ask_member(self, member: Member, round_no: int,
                          messages: tuple[ChatMessage, ...], deadline: float,
                          run: _Run) -> MemberRecord:
        started = self._clock()
        attempts: list[Attempt] = []
        vote: Vote | None = None
        failure = detail = ""
        try:
            async with asyncio.timeout(deadline):
                vote = await self._structured(
                    member.model, messages, VOTE_SCHEMA, VOTE_SCHEMA_NAME,
                    self._config.vote_max_tokens, parse_vote, attempts,
                    lambda: deadline - (self._clock() - started), run.request.tenant_id)
        except TimeoutError:
            failure, detail = "deadline", f"no usable vote within {deadline:.1f} s"
        except ParseError as exc:
            failure, detail = "unparseable", str(exc)
        except FederationError as exc:
            failure, detail = exc.code.value, exc.message
        return MemberRecord(member, round_no, vote, failure, detail,
                            self._clock() - started, tuple(attempts))

    async def _structured(
        self, model: str, messages: tuple[ChatMessage, ...], schema: dict[str, Any],
        schema_name: str, max_tokens: int, parse: Callable[[str], T], attempts: list[Attempt],
        time_left: Callable[[], float], tenant_id: str,
    ) -> T:
        """Ask for JSON; on a parse error ask once more, quoting the error."""
        for attempt in (1, 2):
            text = await self._generate(model, messages, schema, schema_name, max_tokens,
                                        attempts, time_left(), tenant_id)
            try:
                return parse(text)
            except ParseError as exc:
                attempts[-1] = _replace_error(attempts[-1], str(exc))
                if attempt == 2:
                    raise
                messages = (*messages, ChatMessage("assistant", text),
                            ChatMessage("user", _repair_prompt(str(exc), schema)))
        raise AssertionError("unreachable")

    async def _generate(self, model: str, messages: tuple[ChatMessage, ...],
                        schema: dict[str, Any], schema_name: str, max_tokens: int,
                        attempts: list[Attempt], seconds: float, tenant_id: str) -> str:
        request = GenerationRequest(
            model=model, messages=messages, tenant_id=tenant_id,
            sampling=SamplingParams(temperature=self._config.temperature,
                                    max_tokens=max_tokens,
                                    repeat_penalty=self._config.repeat_penalty),
            response_format=ResponseFormat("json_schema", schema_text(schema), schema_name),
        )
        sha = prompt_sha256(messages)
        started = self._clock()
        parts: list[str] = []
        finished: GenerationFinished | None = None
        attempts.append(Attempt(messages, sha))
        try:
            events = self._generator.generate(request, deadline_seconds=max(0.001, seconds))
            async with contextlib.aclosing(events):  # leaving early cancels the gRPC call
                async for event in events:
                    if isinstance(event, TokenDelta):
                        parts.append(event.text)
                    else:
                        finished = event
        except (FederationError, asyncio.CancelledError, TimeoutError) as exc:
            error = exc.message if isinstance(exc, FederationError) else "deadline"
            attempts[-1] = Attempt(messages, sha, "".join(parts), error,
                                   self._clock() - started)
            raise
        text = "".join(parts)
        attempts[-1] = Attempt(
            messages, sha, text, "", self._clock() - started,
            finished.prompt_tokens if finished else 0,
            finished.completion_tokens if finished else 0,
        )
        if finished is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the generation ended early")
        if finished.finish_reason == "length":
            # Parsed anyway: a cut-off object fails to parse and gets its repair attempt.
            attempts[-1] = _replace_error(attempts[-1], "cut off at max_tokens")
        return text

    async def _check_quorum(self, run: _Run, voted: dict[str, MemberRecord]) -> None:
        if len(voted) >= run.required:
            return
        missing = _missing(run, voted)
        names = ", ".join(f"{m.member.name} ({m.reason})" for m in missing)
        run.trail.next_stage()
        run.trail.write(trail_actions.ACTION_UNAVAILABLE, run.request.council or "full",
                        {"voted": str(len(voted)), "required": str(run.required)},
                        {"missing": [{"member": m.member.key, "reason": m.reason}
                                     for m in missing],
                         "voted": len(voted), "required": run.required})
        await run.trail.close()  # the refusal is audited too; an audit failure wins
        raise FederationError(
            ErrorCode.UNAVAILABLE,
            f"the council has no quorum: {len(voted)} of {len(run.asked)} members voted, "
            f"{run.required} required; missing members: {names}",
            retry_after_seconds=1.0,
        )

    # -- synthesis -----------------------------------------------------------------------

    async def _synthesise(self, run: _Run, final: tuple[MemberRecord, ...]) -> CouncilOutcome:
        weighted = [WeightedVote(r.member.key, r.member.weight, r.vote) for r in final if r.vote]
        score = support(weighted)
        tally = tally_decision(score)
        messages = self._chair_messages(run, final, score, tally)
        attempts: list[Attempt] = []
        started = self._clock()
        deadline = max(0.0, min(self._config.synthesis_deadline_seconds, run.remaining()))
        synthesis: Synthesis | None = None
        failure = ""
        try:
            async with asyncio.timeout(deadline):
                synthesis = await self._structured(
                    self.roster.chair.model, messages, SYNTHESIS_SCHEMA, SYNTHESIS_SCHEMA_NAME,
                    self._config.synthesis_max_tokens, parse_synthesis, attempts,
                    lambda: deadline - (self._clock() - started), run.request.tenant_id)
        except TimeoutError:
            failure = "deadline"
        except ParseError:
            failure = "unparseable"
        except FederationError as exc:
            failure = exc.code.value
        chair = SynthesisRecord(tuple(attempts), synthesis, failure, self._clock() - started)
        fallback = synthesis is None
        if synthesis is None:
            log.warning("the chair's synthesis failed: answering with the weighted tally",
                        extra={"request_id": run.request.request_id, "failure": failure,
                               "attempts": len(attempts),
                               "last_error": attempts[-1].error if attempts else ""})
            synthesis = fallback_synthesis(weighted, _FALLBACK_WHY.get(
                failure, "the chair was unavailable"))
            decision, concerns = synthesis.decision, synthesis.remaining_concerns
        else:
            decision, note = reconcile(synthesis.decision, tally)
            concerns = synthesis.remaining_concerns + ((note,) if note else ())
        tokens = [a for r in run.records for a in r.attempts] + attempts
        outcome = CouncilOutcome(
            request_id=run.request.request_id, question=run.request.question.strip(),
            council=run.request.council, asked=run.asked, rounds=run.rounds,
            records=tuple(run.records), final_votes=final, missing=tuple(_missing(run, {
                r.member.key: r for r in final})),
            required=run.required, answer=synthesis.answer, decision=decision,
            confidence=council_confidence(weighted), support=score,
            concerns=tuple(concerns), fallback=fallback, chair=chair,
            prompt_tokens=sum(a.prompt_tokens for a in tokens),
            completion_tokens=sum(a.completion_tokens for a in tokens),
        )
        run.trail.write(trail_actions.ACTION_SYNTHESIS, self.roster.chair.key,
                        trail_actions.synthesis_attributes(outcome),
                        trail_actions.synthesis_body(outcome, score, tally))
        return outcome

    # -- prompts -------------------------------------------------------------------------

    def _request_body(self, run: _Run) -> dict[str, Any]:
        return {
            "question": run.request.question.strip(),
            "council": run.request.council or "full",
            "rounds": run.rounds,
            "required": run.required,
            "member_deadline_seconds": run.member_deadline,
            "members": [{"key": m.key, "name": m.name, "specialty": m.specialty,
                         "model": m.model, "weight": m.weight,
                         "system_sha256": m.system_sha256} for m in run.asked],
            "chair": {"key": self.roster.chair.key, "model": self.roster.chair.model},
            "roster": self.roster.source,
        }

    @staticmethod
    def _round1_messages_factory(run: _Run) -> Callable[[Member], tuple[ChatMessage, ...]]:
        question = _question_block(run.request.question.strip())

        def messages(member: Member) -> tuple[ChatMessage, ...]:
            return (ChatMessage("system", member.system),
                    ChatMessage("user", question + _VOTE_INSTRUCTION.lstrip()))

        return messages

    def _round2_messages_factory(
        self, run: _Run, first: dict[str, MemberRecord]
    ) -> Callable[[Member], tuple[ChatMessage, ...]]:
        order = [r for m in run.asked if (r := first.get(m.key)) is not None]
        random.Random(run.request.request_id).shuffle(order)  # anonymised, reproducibly
        labels = {r.member.key: f"Member {string.ascii_uppercase[i % 26]}"
                  for i, r in enumerate(order)}

        def messages(member: Member) -> tuple[ChatMessage, ...]:
            own = first[member.key]
            lines = [f"- {labels[r.member.key]}: {_vote_line(r)}"
                     for r in order if r.member.key != member.key]
            text = (
                _question_block(run.request.question.strip())
                + "Round 1 of the council's votes (anonymised):\n" + "\n".join(lines)
                + f"\n\nYour own round-1 vote: {_vote_line(own)}\n\n"
                + "Weigh the concerns the others flagged. Vote again: keep your stance or "
                  "change it if they convinced you." + _VOTE_INSTRUCTION
            )
            return (ChatMessage("system", member.system), ChatMessage("user", text))

        return messages

    def _chair_messages(self, run: _Run, final: Sequence[MemberRecord], score: float,
                        tally: Decision) -> tuple[ChatMessage, ...]:
        lines = [f"- {r.member.name} ({r.member.description}): {_vote_line(r)}" for r in final]
        missing = _missing(run, {r.member.key: r for r in final})
        absent = ("\nDid not vote: " + ", ".join(f"{m.member.name} ({m.reason})"
                                                 for m in missing)) if missing else ""
        text = (
            _question_block(run.request.question.strip())
            + f"Votes of the council ({len(final)} of {len(run.asked)} members):\n"
            + "\n".join(lines) + absent
            + f"\n\nThe weighted tally supports: {tally.value} (support {score:+.2f}).\n"
            + 'Reply with a JSON object with the keys "answer" (your answer to the question, '
              'in two or three sentences), "decision" (authorized, blocked or needs_review) '
              'and "remaining_concerns" (a list of unresolved risks; may be empty).'
        )
        return (ChatMessage("system", self.roster.chair_system), ChatMessage("user", text))


_VOTE_INSTRUCTION = (
    "\n\nVote from your specialty. Reply with a JSON object with the keys \"stance\" "
    "(approve, reject or abstain), \"confidence\" (a number from 0 to 1), \"rationale\" "
    "(your reason, in one sentence) and \"concerns\" (a list of short risks; may be empty)."
)


def _question_block(question: str) -> str:
    return f"Question put to the council:\n{question}\n\n"


def _vote_line(record: MemberRecord) -> str:
    vote = record.vote
    if vote is None:
        return "no vote"
    concerns = "; ".join(vote.concerns) or "none"
    return (f"{vote.stance.value} (confidence {vote.confidence:.2f}). "
            f"Rationale: {vote.rationale or '-'} Concerns: {concerns}")


def _repair_prompt(error: str, schema: dict[str, Any]) -> str:
    return (f"Your reply could not be used: {error}. Reply again with only a JSON object "
            f"matching this schema, nothing else: {schema_text(schema)}")


def _replace_error(attempt: Attempt, error: str) -> Attempt:
    return replace(attempt, error=error)


def _missing(run: _Run, voted: dict[str, MemberRecord]) -> list[Missing]:
    out: list[Missing] = []
    for member in run.asked:
        if member.key in voted:
            continue
        failed = [r for r in run.records if r.member.key == member.key and r.round == 1]
        out.append(Missing(member, failed[-1].failure if failed else "not asked"))
    return out


def _with_sequences(outcome: CouncilOutcome, sequences: list[int]) -> CouncilOutcome:
    return replace(outcome, audit_sequences=tuple(sequences))
