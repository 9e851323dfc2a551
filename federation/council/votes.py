"""Structured votes and syntheses: their JSON schemas and a forgiving, exact parser.

Members are asked for JSON constrained by :data:`VOTE_SCHEMA` (llama.cpp turns it
into a grammar; OpenAI-compatible upstreams get ``response_format``), so a
well-behaved backend always returns a valid object. The parser still accepts
the usual deviations of models that ignore the constraint (a code fence, prose
around the object, a percentage instead of a fraction, one concern given as a
string) and refuses everything that would change the meaning (no stance, an
unknown stance, confidence outside 0-100). What it refuses, it explains in one
line: that line is sent back to the member for its one repair attempt.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, TypeVar

E = TypeVar("E", bound=enum.Enum)

MAX_RATIONALE_CHARS: Final = 600
MAX_CONCERNS: Final = 3
MAX_CONCERN_CHARS: Final = 200
MAX_ANSWER_CHARS: Final = 1200


class Stance(enum.Enum):
    APPROVE = "approve"
    REJECT = "reject"
    ABSTAIN = "abstain"

    @property
    def sign(self) -> int:
        return {Stance.APPROVE: 1, Stance.REJECT: -1, Stance.ABSTAIN: 0}[self]


class Decision(enum.Enum):
    AUTHORIZED = "authorized"
    BLOCKED = "blocked"
    NEEDS_REVIEW = "needs_review"


# Grammar-bound lengths keep a whole vote within vote_max_tokens (256): ~75 tokens of
# rationale, ~30 per concern, so a verbose member is never cut off mid-object (which
# fails the parse). llama.cpp expands maxLength into one nested rule per character;
# these sizes compile (llama_sampler_init_grammar) and sample at the usual speed.
SCHEMA_RATIONALE_CHARS: Final = 300
SCHEMA_CONCERN_CHARS: Final = 120
VOTE_SCHEMA_NAME: Final = "council_vote"
VOTE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "stance": {"type": "string", "enum": [s.value for s in Stance]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "rationale": {"type": "string", "maxLength": SCHEMA_RATIONALE_CHARS},
        "concerns": {"type": "array", "maxItems": MAX_CONCERNS,
                     "items": {"type": "string", "maxLength": SCHEMA_CONCERN_CHARS}},
    },
    "required": ["stance", "confidence", "rationale", "concerns"],
    "additionalProperties": False,
}

SYNTHESIS_SCHEMA_NAME: Final = "council_synthesis"
SYNTHESIS_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string"},
        "decision": {"type": "string", "enum": [d.value for d in Decision]},
        "remaining_concerns": {"type": "array", "items": {"type": "string"},
                               "maxItems": MAX_CONCERNS},
    },
    "required": ["answer", "decision", "remaining_concerns"],
    "additionalProperties": False,
}


def schema_text(schema: dict[str, Any]) -> str:
    # Key order kept: grammars generate properties in schema order, and a small model
    # does better stating its stance first and its concerns last.
    return json.dumps(schema, separators=(",", ":"))


class ParseError(ValueError):
    """The output is not a usable object; the message says why, for the repair prompt."""


@dataclass(frozen=True)
class Vote:
    stance: Stance
    confidence: float
    rationale: str
    concerns: tuple[str, ...]


@dataclass(frozen=True)
class Synthesis:
    answer: str
    decision: Decision
    remaining_concerns: tuple[str, ...]


def parse_vote(text: str) -> Vote:
    data = _object(text)
    stance = _enum(data, "stance", Stance, {"approved": "approve", "yes": "approve",
                                            "rejected": "reject", "no": "reject",
                                            "abstained": "abstain"})
    return Vote(
        stance=stance,
        confidence=_confidence(data.get("confidence")),
        rationale=_short_text(data.get("rationale", ""), "rationale", MAX_RATIONALE_CHARS),
        concerns=_concerns(data.get("concerns", [])),
    )


def parse_synthesis(text: str) -> Synthesis:
    data = _object(text)
    decision = _enum(data, "decision", Decision, {"authorised": "authorized",
                                                  "approve": "authorized",
                                                  "block": "blocked",
                                                  "needs review": "needs_review",
                                                  "review": "needs_review"})
    answer = _short_text(data.get("answer", ""), "answer", MAX_ANSWER_CHARS)
    if not answer:
        raise ParseError('"answer" must be a non-empty string')
    if not _reads_as_prose(answer):
        # Small models under a grammar sometimes fill the field with punctuation and
        # stray words (", approved, authorized"); the user would see that as the answer.
        raise ParseError('"answer" must be sentences in words, starting with a word')
    return Synthesis(answer, decision, _concerns(data.get("remaining_concerns", [])))


def vote_to_json(vote: Vote) -> dict[str, Any]:
    return {"stance": vote.stance.value, "confidence": vote.confidence,
            "rationale": vote.rationale, "concerns": list(vote.concerns)}


# ---- helpers ---------------------------------------------------------------------------

_WORD = re.compile(r"[^\W\d_]{2,}")


def _reads_as_prose(text: str) -> bool:
    """Starts like a sentence (a letter, digit or opening quote) and has a real word."""
    return (text[0].isalnum() or text[0] in "\"'(\u201c") and _WORD.search(text) is not None


def _object(text: str) -> dict[str, Any]:
    """The first JSON object in ``text``, tolerating fences and prose around it."""
    stripped = text.strip()
    if not stripped:
        raise ParseError("the reply is empty; a JSON object was expected")
    start = stripped.find("{")
    if start < 0:
        raise ParseError("the reply contains no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped[start:])
    except json.JSONDecodeError as exc:
        raise ParseError(f"the JSON object is malformed: {exc.msg} at character "
                         f"{exc.pos}") from None
    if not isinstance(value, dict):
        raise ParseError("the reply is not a JSON object")
    return value


def _enum(data: dict[str, Any], name: str, kind: type[E],
                        synonyms: dict[str, str]) -> E:
    raw = data.get(name)
    allowed = ", ".join(str(e.value) for e in kind)
    if not isinstance(raw, str):
        raise ParseError(f'"{name}" is missing; it must be one of {allowed}')
    value = raw.strip().lower().replace("-", "_")
    value = synonyms.get(value, value)
    try:
        return kind(value)
    except ValueError:
        raise ParseError(f'"{name}" is {raw!r}; it must be one of {allowed}') from None


def _confidence(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ParseError('"confidence" must be a number between 0 and 1')
    try:
        value = float(raw.strip().rstrip("%")) if isinstance(raw, str) else float(raw)
    except ValueError:
        raise ParseError(f'"confidence" is {raw!r}; it must be a number between 0 and 1'
                         ) from None
    if isinstance(raw, str) and raw.strip().endswith("%"):
        value /= 100
    elif 1 < value <= 100:
        value /= 100  # a percentage given as a number
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise ParseError(f'"confidence" is {raw!r}; it must be between 0 and 1')
    return value


def _short_text(raw: Any, name: str, limit: int) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ParseError(f'"{name}" must be a string')
    return raw.strip()[:limit]


def _concerns(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw] if raw.strip() else []
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ParseError('"concerns" must be a list of strings')
    # A concern with no letter at all ("1", "- -") is a small model numbering its list,
    # not a concern: the user sees concerns, so it is dropped rather than shown.
    cleaned = [c.strip()[:MAX_CONCERN_CHARS] for c in raw if _has_letter(c)]
    return tuple(dict.fromkeys(cleaned))[:MAX_CONCERNS]


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)
