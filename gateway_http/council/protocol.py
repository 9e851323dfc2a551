"""What the council's HTTP API looks like: the vote body, the model names, and the
council's protobuf answers as JSON and Server-Sent Events. Only ``routes.py`` knows
aiohttp; ``serving.py`` makes the gRPC calls."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from federation.council.disclosure import level_from_int
from federation.errors import ErrorCode, FederationError
from federation.inference.types import ChatMessage
from federation.v1 import council_pb2

log = logging.getLogger(__name__)

COUNCIL_MODEL: Final = "council"
MAX_BODY_QUESTION: Final = 4000
SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}
DONE: Final = b"data: [DONE]\n\n"
DECISIONS: Final = {council_pb2.DECISION_AUTHORIZED: "authorized",
                    council_pb2.DECISION_BLOCKED: "blocked",
                    council_pb2.DECISION_NEEDS_REVIEW: "needs_review"}
STANCES: Final = {council_pb2.STANCE_APPROVE: "approve", council_pb2.STANCE_REJECT: "reject",
                  council_pb2.STANCE_ABSTAIN: "abstain"}


def council_model_ids(councils: Sequence[str]) -> list[str]:
    return [COUNCIL_MODEL, *(f"{COUNCIL_MODEL}/{name}" for name in councils)]


def is_council_model(model: str) -> bool:
    return model == COUNCIL_MODEL or model.startswith(COUNCIL_MODEL + "/")


@dataclass(frozen=True)
class VoteBody:
    question: str
    council: str = ""
    rounds: int = 0
    level: int = 1
    specialty: str = ""
    stream: bool = False


def parse_vote_body(data: Any) -> VoteBody:
    """``data``: the parsed JSON body (``gateway_http/body.py``; ``None`` without one)."""
    if not isinstance(data, dict):
        raise invalid(None, "The request body must be a JSON object.")
    question = data.get("question")
    if question is None:
        raise invalid("question", "Missing required parameter: 'question'.")
    if not isinstance(question, str):
        raise invalid("question", "Invalid type for 'question': expected a string, got "
                                  f"{json_type(question)}.")
    if not question.strip():
        raise invalid("question", "Invalid value for 'question': it must not be empty.")
    fields: dict[str, Any] = {"question": question}
    for name, kind in (("council", str), ("specialty", str), ("rounds", int), ("level", int),
                       ("stream", bool)):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise invalid(name, f"Invalid type for '{name}': expected {JSON_TYPES[kind]}, "
                                f"got {json_type(value)}.")
        fields[name] = value
    unknown = sorted(set(data) - {"question", "council", "specialty", "rounds", "level",
                                  "stream"})
    if unknown:
        log.info("ignored request fields", extra={"fields": ",".join(unknown)})
    body = VoteBody(**fields)
    if body.rounds not in (0, 1, 2):
        raise invalid("rounds", "Invalid value for 'rounds': 1 or 2.")
    level_from_int(body.level)
    return body


def reported(confidence: float) -> float:
    """A confidence as users read it: three decimals (the audit record's precision), not
    the float arithmetic's tail (0.5399999999999999)."""
    return round(confidence, 3)


def result_json(result: council_pb2.CouncilResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "council.result",
        "request_id": result.request_id,
        "answer": result.answer,
        "decision": DECISIONS.get(result.decision, "needs_review"),
        "confidence": reported(result.confidence),
        "concerns": list(result.concerns),
        "fallback_synthesis": result.fallback_synthesis,
        "rounds": result.rounds,
        "level": int(result.level),
        "quorum": {
            "asked": result.quorum.asked, "voted": result.quorum.voted,
            "required": result.quorum.required,
            "missing": [{"member": m.member, "reason": m.reason}
                        for m in result.quorum.missing],
        },
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "completion_tokens": result.usage.completion_tokens,
                  "total_tokens": result.usage.total_tokens},
    }
    if result.level >= council_pb2.DISCLOSURE_LEVEL_CHIEFS:
        body["members"] = [member_json(m) for m in result.members]
    if result.audit_sequences:
        body["audit_sequences"] = list(result.audit_sequences)
    return body


def member_json(vote: council_pb2.MemberVote) -> dict[str, Any]:
    out: dict[str, Any] = {
        "member": vote.member, "name": vote.display_name, "specialty": vote.specialty,
        "round": vote.round, "stance": STANCES.get(vote.stance, "abstain"),
        "confidence": reported(vote.confidence), "concerns": list(vote.concerns),
    }
    if vote.rationale:
        out["rationale"] = vote.rationale
    if vote.HasField("latency"):
        out["latency_ms"] = round(vote.latency.ToNanoseconds() / 1e6, 3)
    if vote.prompt_sha256:
        out["prompt_sha256"] = vote.prompt_sha256
    return out


def event_json(event: council_pb2.VoteResponse) -> dict[str, Any]:
    kind = event.WhichOneof("event")
    if kind == "member_started":
        return {"type": kind, "member": event.member_started.member,
                "round": event.member_started.round}
    if kind == "member_voted":
        voted = event.member_voted
        out: dict[str, Any] = {"type": kind, "member": voted.member, "round": voted.round}
        if voted.HasField("vote"):
            out["vote"] = member_json(voted.vote)
        return out
    if kind == "member_failed":
        failed = event.member_failed
        return {"type": kind, "member": failed.member, "round": failed.round,
                "reason": failed.reason}
    if kind == "synthesis_started":
        return {"type": kind, "vote_count": event.synthesis_started.vote_count}
    return {"type": "result", **result_json(event.result)}


def council_extra(result: council_pb2.CouncilResult) -> dict[str, Any]:
    """The ``council`` object added to chat completions."""
    return {
        "request_id": result.request_id,
        "decision": DECISIONS.get(result.decision, "needs_review"),
        "confidence": reported(result.confidence),
        "concerns": list(result.concerns),
        "fallback_synthesis": result.fallback_synthesis,
        "quorum": {"asked": result.quorum.asked, "voted": result.quorum.voted,
                   "required": result.quorum.required,
                   "missing": [{"member": m.member, "reason": m.reason}
                               for m in result.quorum.missing]},
    }


def last_user_message(messages: Sequence[ChatMessage]) -> str:
    """The question: the last user message that says something."""
    for message in reversed(messages):
        if message.role == "user" and message.content.strip():
            return message.content
    raise invalid("messages", "The council needs a user message with the question.")


def pieces(text: str, size: int = 48) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def comment(event: council_pb2.VoteResponse) -> bytes:
    info = event_json(event)
    return (": " + json.dumps(info, separators=(",", ":")) + "\n\n").encode()


def sse(value: dict[str, Any]) -> bytes:
    return b"data: " + dumps(value).encode() + b"\n\n"


JSON_TYPES: Final = {str: "a string", int: "an integer", bool: "a boolean"}


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def invalid(param: str | None, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
