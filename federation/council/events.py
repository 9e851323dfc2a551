"""What a deliberation takes and produces: the request, the progress events, each
member's record and the outcome; and what the council needs from inference.

Plain frozen dataclasses; :mod:`federation.council.engine` produces them,
:mod:`federation.council.convert` turns them into protobuf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from federation.council.members import Member
from federation.council.votes import Decision, Synthesis, Vote
from federation.inference.types import ChatMessage, GenerationEvent, GenerationRequest


class TextGenerator(Protocol):
    """What the council needs from the inference path (``InferenceRouter`` has it)."""

    def generate(self, request: GenerationRequest, *, deadline_seconds: float | None = None
                 ) -> AsyncGenerator[GenerationEvent, None]: ...


@dataclass(frozen=True)
class CouncilRequest:
    question: str
    request_id: str
    tenant_id: str = ""
    council: str = ""
    """Sub-council name; empty asks the full council."""
    rounds: int = 0
    """1 or 2; 0 uses the configured default."""
    member_deadline: float | None = None
    overall_deadline: float | None = None
    quorum: int = 0
    """Explicit number of votes required; 0 scales the configured quorum."""


@dataclass(frozen=True)
class Attempt:
    """One model call: what was sent, what came back."""

    messages: tuple[ChatMessage, ...]
    prompt_sha256: str
    output: str = ""
    error: str = ""
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class MemberRecord:
    """One member in one round: its vote or why it has none, and every attempt."""

    member: Member
    round: int
    vote: Vote | None
    failure: str
    """Empty when voted; else a short reason (``deadline``, ``unparseable``, …)."""
    detail: str
    seconds: float
    attempts: tuple[Attempt, ...]

    @property
    def prompt_sha256(self) -> str:
        """Hash of the prompt that produced the vote (the last attempt's)."""
        return self.attempts[-1].prompt_sha256 if self.attempts else ""


@dataclass(frozen=True)
class MemberStarted:
    member: Member
    round: int


@dataclass(frozen=True)
class MemberVoted:
    record: MemberRecord


@dataclass(frozen=True)
class MemberFailed:
    record: MemberRecord


@dataclass(frozen=True)
class SynthesisStarted:
    vote_count: int


@dataclass(frozen=True)
class Missing:
    member: Member
    reason: str


@dataclass(frozen=True)
class SynthesisRecord:
    attempts: tuple[Attempt, ...]
    synthesis: Synthesis | None
    failure: str
    seconds: float


@dataclass(frozen=True)
class CouncilOutcome:
    request_id: str
    question: str
    council: str
    asked: tuple[Member, ...]
    rounds: int
    records: tuple[MemberRecord, ...]
    """Every member record of every round, in arrival order."""
    final_votes: tuple[MemberRecord, ...]
    """The vote that counts for each member who voted, in roster order."""
    missing: tuple[Missing, ...]
    required: int
    answer: str
    decision: Decision
    confidence: float
    support: float
    concerns: tuple[str, ...]
    fallback: bool
    chair: SynthesisRecord
    prompt_tokens: int
    completion_tokens: int
    audit_sequences: tuple[int, ...] = ()


CouncilEvent = MemberStarted | MemberVoted | MemberFailed | SynthesisStarted | CouncilOutcome


def prompt_sha256(messages: Sequence[ChatMessage]) -> str:
    """SHA-256 of the exact prompt: compact JSON of ``[{"role", "content"}, …]``."""
    canonical = json.dumps([{"role": m.role, "content": m.content} for m in messages],
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
