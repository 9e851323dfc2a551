"""The council's breadcrumb trail in thermal memory, written before any answer leaves,
and what each of its records holds.

Records of one deliberation share its request id and are written in stages, so
that their chain order tells the story: the request, then each round's votes
(in the order they arrived), then the synthesis. A stage's writes start as soon
as their content exists, concurrently with the rest of the deliberation, but
each waits for the previous stage's writes to commit first. The caller awaits
:meth:`AuditTrail.close` before returning an answer: if any write failed, the
council answers nothing (Two Wolves: no answer without its complete record).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from federation.council.events import Attempt, CouncilOutcome, MemberRecord
from federation.council.tally import WeightedVote, concerns_union
from federation.council.votes import Decision, vote_to_json
from federation.errors import ErrorCode, FederationError
from federation.memory.records import AuditEntry
from federation.memory.sink import AuditSink

log = logging.getLogger(__name__)

ACTOR: Final = "council"
ACTION_REQUEST: Final = "council.request"
ACTION_VOTE: Final = "council.vote"
ACTION_SYNTHESIS: Final = "council.synthesis"
ACTION_UNAVAILABLE: Final = "council.unavailable"


def audit_failed() -> FederationError:
    return FederationError(
        ErrorCode.UNAVAILABLE,
        "the council could not record its deliberation in thermal memory, so it gives no "
        "answer",
        retry_after_seconds=1.0,
    )


class AuditTrail:
    def __init__(self, sink: AuditSink, *, request_id: str, tenant_id: str) -> None:
        self._sink = sink
        self._request_id = request_id
        self._tenant_id = tenant_id
        self._previous: list[asyncio.Task[int]] = []
        self._current: list[asyncio.Task[int]] = []
        self._all: list[asyncio.Task[int]] = []

    def next_stage(self) -> None:
        """Writes spawned from now on commit after every write spawned so far."""
        if self._current:
            self._previous, self._current = self._current, []

    def write(self, action: str, subject: str, attributes: Mapping[str, str],
              body: Mapping[str, Any]) -> None:
        entry = AuditEntry(
            actor=ACTOR, action=action, tenant_id=self._tenant_id, subject=subject,
            attributes=dict(attributes), request_id=self._request_id,
            body=json.dumps(body, separators=(",", ":"), ensure_ascii=False,
                            sort_keys=True).encode(),
        )
        task = asyncio.create_task(self._write(entry, list(self._previous)))
        self._current.append(task)
        self._all.append(task)

    async def _write(self, entry: AuditEntry, after: list[asyncio.Task[int]]) -> int:
        if after:
            await asyncio.gather(*after)  # an earlier failure fails this write too
        record = await self._sink.record(entry)
        return record.sequence

    def failed(self) -> bool:
        """True as soon as any finished write has failed (lets callers stop early)."""
        return any(t.done() and not t.cancelled() and t.exception() is not None
                   for t in self._all)

    async def close(self) -> list[int]:
        """Wait for every write; their sequences in chain order. Raises if any failed.

        Writes of one stage run concurrently, so the chain may hold them in another
        order than they were spawned in; the stages themselves are in order."""
        results = await asyncio.gather(*self._all, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.error("council audit write failed", extra={
                "request_id": self._request_id, "error": repr(errors[0])[:200]})
            raise audit_failed() from errors[0]
        return sorted(r for r in results if isinstance(r, int))

    def detach(self) -> None:
        """The caller went away: let pending writes finish on their own (what was
        computed is still recorded) and log, rather than leak, their failures."""
        for task in self._all:
            task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("council audit write failed after the caller left",
                    extra={"error": repr(task.exception())[:200]})


# ---- record contents ----------------------------------------------------------------

def attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "messages": [{"role": m.role, "content": m.content} for m in a.messages],
        "prompt_sha256": a.prompt_sha256, "output": a.output, "error": a.error,
        "seconds": round(a.seconds, 6), "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
    }


def vote_attributes(record: MemberRecord) -> dict[str, str]:
    attributes = {
        "member": record.member.key, "round": str(record.round),
        "latency_ms": f"{record.seconds * 1000:.1f}", "prompt_sha256": record.prompt_sha256,
        "attempts": str(len(record.attempts)),
    }
    if record.vote:
        attributes |= {"stance": record.vote.stance.value,
                       "confidence": f"{record.vote.confidence:.3f}"}
    else:
        attributes["failure"] = record.failure
    return attributes


def vote_body(record: MemberRecord) -> dict[str, Any]:
    m = record.member
    return {
        "member": {"key": m.key, "name": m.name, "specialty": m.specialty, "model": m.model,
                   "weight": m.weight},
        "round": record.round,
        "vote": vote_to_json(record.vote) if record.vote else None,
        "failure": record.failure, "detail": record.detail,
        "seconds": round(record.seconds, 6),
        "attempts": [attempt_json(a) for a in record.attempts],
    }


def synthesis_attributes(outcome: CouncilOutcome) -> dict[str, str]:
    return {
        "decision": outcome.decision.value, "confidence": f"{outcome.confidence:.3f}",
        "fallback": str(outcome.fallback).lower(),
        "prompt_sha256": outcome.chair.attempts[-1].prompt_sha256
        if outcome.chair.attempts else "",
        "latency_ms": f"{outcome.chair.seconds * 1000:.1f}",
        "voted": str(len(outcome.final_votes)), "asked": str(len(outcome.asked)),
    }


def synthesis_body(outcome: CouncilOutcome, score: float, tally: Decision) -> dict[str, Any]:
    chair = outcome.chair
    return {
        "chair": {
            "attempts": [attempt_json(a) for a in chair.attempts],
            "failure": chair.failure, "seconds": round(chair.seconds, 6),
            "synthesis": None if chair.synthesis is None else {
                "answer": chair.synthesis.answer, "decision": chair.synthesis.decision.value,
                "remaining_concerns": list(chair.synthesis.remaining_concerns)},
        },
        "tally": {"support": score, "decision": tally.value,
                  "concerns_union": list(concerns_union(
                      [WeightedVote(r.member.key, r.member.weight, r.vote)
                       for r in outcome.final_votes if r.vote]))},
        "result": {
            "answer": outcome.answer, "decision": outcome.decision.value,
            "confidence": outcome.confidence, "concerns": list(outcome.concerns),
            "fallback": outcome.fallback, "rounds": outcome.rounds,
            "quorum": {"asked": len(outcome.asked), "voted": len(outcome.final_votes),
                       "required": outcome.required,
                       "missing": [{"member": m.member.key, "reason": m.reason}
                                   for m in outcome.missing]},
            "usage": {"prompt_tokens": outcome.prompt_tokens,
                      "completion_tokens": outcome.completion_tokens},
        },
    }
