"""Two Wolves: how much of a deliberation a caller sees, by the scopes of its key.

=====  ======================  ==================================================
Level  Scope                   Sees
=====  ======================  ==================================================
1      ``council``             answer, decision, confidence, concerns, quorum
2      ``council:chiefs``      + every member's stance, confidence and concerns
3      ``council:specialist``  + one named specialty's full record (rationale,
                               latency, prompt hash)
4      ``memory:audit``        + every member's full record and the thermal-memory
                               sequences of the deliberation's audit trail
=====  ======================  ==================================================

A request for level ``n`` needs the ``council`` scope (to consult the council at
all) and the level's own scope, held literally: the key authority's prefix rule
(``council`` granting ``council:*``) does not apply here, so a plain ``council``
key sees level 1 only. Whatever the level, the complete record is in thermal
memory (the Security Wolf); disclosure only limits what the answer carries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from federation.council.events import CouncilOutcome, MemberRecord
from federation.council.members import Member, Roster
from federation.errors import ErrorCode, FederationError

SCOPES_METADATA: Final = "x-federation-key-scopes"
"""gRPC metadata through which the gateway passes the verified key's scopes
(comma-separated). Only trusted from the ``gateway`` role."""

BASE_SCOPE: Final = "council"


class Level(enum.IntEnum):
    ANSWER = 1
    CHIEFS = 2
    SPECIALIST = 3
    AUDIT = 4


LEVEL_SCOPES: Final[dict[Level, str]] = {
    Level.ANSWER: "council",
    Level.CHIEFS: "council:chiefs",
    Level.SPECIALIST: "council:specialist",
    Level.AUDIT: "memory:audit",
}


def level_from_int(value: int) -> Level:
    if value == 0:
        return Level.ANSWER
    try:
        return Level(value)
    except ValueError:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "level must be 1, 2, 3 or 4",
                              param="level") from None


def check_access(level: Level, scopes: Iterable[str]) -> None:
    """PERMISSION_DENIED unless ``scopes`` hold ``council`` and the level's scope."""
    held = set(scopes)
    needed = [s for s in (BASE_SCOPE, LEVEL_SCOPES[level]) if s not in held]
    if needed:
        raise FederationError(
            ErrorCode.PERMISSION_DENIED,
            f"disclosure level {int(level)} needs the scope "
            + " and ".join(repr(s) for s in dict.fromkeys(needed)),
            param="level",
        )


@dataclass(frozen=True)
class Disclosure:
    """A checked disclosure request: the level and, for level 3, whose records."""

    level: Level
    specialists: frozenset[str] = frozenset()
    """Member keys whose full record level 3 discloses."""

    def covers(self, member: Member) -> bool:
        """Whether ``member``'s full record (rationale, latency, prompt hash) is shown."""
        return self.level is Level.AUDIT or (
            self.level is Level.SPECIALIST and member.key in self.specialists)


def resolve(level: Level, specialty: str, scopes: Iterable[str], roster: Roster) -> Disclosure:
    check_access(level, scopes)
    if level is not Level.SPECIALIST:
        return Disclosure(level)
    if not specialty.strip():
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              "disclosure level 3 needs a specialty", param="specialty")
    members = roster.find_specialty(specialty)
    if not members:
        known = ", ".join(m.specialty for m in roster.members)
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"unknown specialty {specialty!r}; known: {known}",
                              param="specialty")
    return Disclosure(level, frozenset(m.key for m in members))


@dataclass(frozen=True)
class MemberView:
    """One member's vote as disclosed. ``None`` fields are withheld."""

    member: str
    name: str
    specialty: str
    round: int
    stance: str
    confidence: float
    concerns: tuple[str, ...]
    rationale: str | None = None
    seconds: float | None = None
    prompt_sha256: str | None = None


def member_view(record: MemberRecord, disclosure: Disclosure) -> MemberView | None:
    """The part of a vote ``disclosure`` allows; ``None`` at level 1 or for a failure."""
    if disclosure.level < Level.CHIEFS or record.vote is None:
        return None
    full = disclosure.covers(record.member)
    vote = record.vote
    return MemberView(
        member=record.member.key, name=record.member.name, specialty=record.member.specialty,
        round=record.round, stance=vote.stance.value, confidence=vote.confidence,
        concerns=vote.concerns,
        rationale=vote.rationale if full else None,
        seconds=record.seconds if full else None,
        prompt_sha256=record.prompt_sha256 if full else None,
    )


def member_views(outcome: CouncilOutcome, disclosure: Disclosure) -> list[MemberView]:
    """Disclosed votes of every round, ordered by round then roster order."""
    order = {m.key: i for i, m in enumerate(outcome.asked)}
    records = sorted(outcome.records, key=lambda r: (r.round, order.get(r.member.key, 0)))
    return [v for r in records if (v := member_view(r, disclosure)) is not None]


def audit_sequences(outcome: CouncilOutcome, disclosure: Disclosure) -> tuple[int, ...]:
    return outcome.audit_sequences if disclosure.level is Level.AUDIT else ()
