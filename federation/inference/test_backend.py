"""A deterministic backend: it echoes the last user message, word by word.

Used by tests and by the gateway benchmark (zero delays: only the path around
the backend is measured). Delays and failures can be injected, and counters
let tests observe that cancellation really reached the backend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Sequence

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit
from federation.inference.types import (
    FinishReason,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    TokenDelta,
)
from federation.logs import request_id_var


def echo_tokens(request: GenerationRequest) -> list[str]:
    """The deltas the test backend produces before max_tokens/stop apply."""
    last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    words = last_user.split() or ["(empty)"]
    tokens = [words[0], *(" " + w for w in words[1:])]
    if request.response_format.type != "text":
        text = json.dumps({"echo": "".join(tokens)})
        # Keep several deltas so JSON output also streams.
        cut = len(text) // 2
        return [text[:cut], text[cut:]]
    return tokens


def prompt_token_count(request: GenerationRequest) -> int:
    """The prompt's tokens as this backend counts them: each message's words, plus one."""
    return sum(len(m.content.split()) + 1 for m in request.messages)


class TestBackend:
    """Echo backend. Attributes may be changed by tests between requests."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        model_ids: Sequence[str] = ("test-model",),
        *,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        capacity: int = 64,
        stall_after_tokens: int | None = None,
    ) -> None:
        self._infos = [ModelInfo(m, "federation", "test", 4096) for m in model_ids]
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.capacity = capacity
        self.stall_after_tokens = stall_after_tokens
        """After this many deltas, produce nothing more until cancelled (a hung GPU)."""
        self.fail_before_first: FederationError | None = None
        """Raised before any delta (the router may retry elsewhere)."""
        self.fail_after_tokens: int | None = None
        """Raise INTERNAL after this many deltas (a mid-stream failure)."""
        self.in_flight = 0
        self.started = 0
        self.completed = 0
        self.cancelled = 0
        self.request_ids: list[str] = []
        """``x-request-id`` seen by each generation (set by the node's interceptor)."""
        self.requests: list[GenerationRequest] = []
        """Every request that started generating, as the backend received it."""

    @classmethod
    def from_config(cls, model: ModelConfig) -> TestBackend:
        return cls(
            (model.id,), token_delay=model.token_delay_seconds, capacity=model.queue_capacity,
            stall_after_tokens=model.stall_after_tokens,
        )

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def models(self) -> Sequence[ModelInfo]:
        return self._infos

    def load(self) -> LoadSnapshot:
        return LoadSnapshot(in_flight=self.in_flight, queued=0, capacity=self.capacity)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if request.model not in {i.id for i in self._infos}:
            raise FederationError(ErrorCode.NOT_FOUND, f"model {request.model!r} is not served")
        if self.in_flight >= self.capacity:
            raise FederationError(ErrorCode.RESOURCE_EXHAUSTED, "test backend is full")
        if self.fail_before_first is not None:
            raise self.fail_before_first
        prompt = prompt_token_count(request)
        limit = completion_limit(request.token_budget, prompt, request.sampling.max_tokens)
        self.started += 1
        self.request_ids.append(request_id_var.get())
        self.requests.append(request)
        self.in_flight += 1
        finished = False
        try:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            count = 0
            reason: FinishReason = "stop"
            for text in _apply_limits(echo_tokens(request), request, limit):
                if self.fail_after_tokens is not None and count >= self.fail_after_tokens:
                    raise FederationError(ErrorCode.INTERNAL, "injected failure")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if self.stall_after_tokens is not None and count >= self.stall_after_tokens:
                    await asyncio.Event().wait()  # wedged: only a cancellation ends it
                count += 1
                yield TokenDelta(text, 1, prompt if count == 1 else None)
            if limit is not None and count >= limit and count < len(echo_tokens(request)):
                reason = "length"
            finished = True
            yield GenerationFinished(reason, prompt, count, request.model)
        finally:
            self.in_flight -= 1
            if finished:
                self.completed += 1
            else:
                self.cancelled += 1


def _apply_limits(tokens: list[str], request: GenerationRequest, limit: int | None = None
                  ) -> list[str]:
    """Cut at ``limit`` (default max_tokens), then before the first stop sequence (which
    is not emitted)."""
    if limit is None:
        limit = request.sampling.max_tokens
    kept = tokens[:limit] if limit is not None else tokens
    stops = [s for s in request.sampling.stop if s]
    out: list[str] = []
    text = ""
    for token in kept:
        text += token
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            head = text[: min(hits)][len(text) - len(token) :]
            if head:
                out.append(head)
            return out
        out.append(token)
    return out
