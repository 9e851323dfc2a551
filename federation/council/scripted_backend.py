"""A deterministic inference backend that plays scripted council members.

It implements the inference :class:`~federation.inference.backend.Backend`
protocol, so tests and the benchmark serve it from a real inference node and
the council reaches it through mTLS gRPC and the real router. Each call is
attributed to a member by the ``You are <Name>`` opening of its system prompt
(the chair's synthesis is told apart by its ``council_synthesis`` schema) and
answered with that member's next scripted reply after its latency.

A reply is text (sent as it is, so it may be malformed on purpose), a
:class:`~federation.errors.FederationError` (raised before any token, as a
failing node would), or :data:`HANG` (never answers: a member that times out).
Replies are consumed in order per member; the last one repeats.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from federation.errors import ErrorCode, FederationError
from federation.inference.types import (
    EmbeddingRequest,
    EmbedEvent,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    TokenDelta,
)

MODEL: Final = "council-scripted"
CHAIR: Final = "chair"
"""Script key of the chair's synthesis calls (its votes use its own name's key)."""
HANG: Final = "\x00hang"
_NAME = re.compile(r"You are ([^,.\n]+)")


def vote_json(stance: str = "approve", confidence: float = 0.9, rationale: str = "Looks sound.",
              concerns: Sequence[str] = ()) -> str:
    return json.dumps({"stance": stance, "confidence": confidence, "rationale": rationale,
                       "concerns": list(concerns)})


def synthesis_json(answer: str = "Proceed.", decision: str = "authorized",
                   concerns: Sequence[str] = ()) -> str:
    return json.dumps({"answer": answer, "decision": decision,
                       "remaining_concerns": list(concerns)})


Reply = str | FederationError


@dataclass
class Script:
    replies: Sequence[Reply] = (vote_json(),)
    latency: float = 0.0
    """Seconds before the first token of every reply."""


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


@dataclass
class ScriptedCouncilBackend:
    """Scripts are keyed by member key (``eagle_eye``) or :data:`CHAIR`."""

    scripts: Mapping[str, Script] = field(default_factory=dict)
    default: Script = field(default_factory=Script)
    default_synthesis: Script = field(default_factory=lambda: Script((synthesis_json(),)))
    model: str = MODEL
    calls: dict[str, int] = field(default_factory=dict)
    """Calls seen per script key."""
    requests: list[tuple[str, GenerationRequest]] = field(default_factory=list)
    in_flight: int = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def models(self) -> Sequence[ModelInfo]:
        return [ModelInfo(self.model, "federation", "test", 4096)]

    def load(self) -> LoadSnapshot:
        return LoadSnapshot(in_flight=self.in_flight, queued=0, capacity=1024)

    def who(self, request: GenerationRequest) -> str:
        if request.response_format.schema_name == "council_synthesis":
            return CHAIR
        system = next((m.content for m in request.messages if m.role == "system"), "")
        found = _NAME.search(system)
        return _key(found.group(1)) if found else ""

    def script_for(self, key: str) -> Script:
        if key in self.scripts:
            return self.scripts[key]
        return self.default_synthesis if key == CHAIR else self.default

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        key = self.who(request)
        script = self.script_for(key)
        index = self.calls.get(key, 0)
        self.calls[key] = index + 1
        self.requests.append((key, request))
        reply = script.replies[min(index, len(script.replies) - 1)]
        self.in_flight += 1
        try:
            if script.latency:
                await asyncio.sleep(script.latency)
            if isinstance(reply, FederationError):
                raise reply
            if reply == HANG:
                await asyncio.Event().wait()
            cut = max(1, len(reply) // 3)
            pieces = [reply[i:i + cut] for i in range(0, len(reply), cut)] or [""]
            for piece in pieces:
                yield TokenDelta(piece)
            prompt = sum(len(m.content.split()) for m in request.messages)
            yield GenerationFinished("stop", prompt, len(pieces), self.model)
        finally:
            self.in_flight -= 1

    async def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"model {self.model} plays council members; it does not embed",
                              param="model")
        yield  # an async generator, like every backend's embed


def busy(message: str = "scripted: the model is busy") -> FederationError:
    """A failure of this call only: the router may try another node, and the node
    stays healthy for the other members (UNAVAILABLE would mark it down)."""
    return FederationError(ErrorCode.RESOURCE_EXHAUSTED, message)


def invalid(message: str = "scripted bad request") -> FederationError:
    """A failure the router does not retry."""
    return FederationError(ErrorCode.INVALID_ARGUMENT, message)
