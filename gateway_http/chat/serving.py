"""Chat completions: turns a validated call into a response object or an SSE stream.

No HTTP here. ``create`` returns a completion dict, or an async iterator of
SSE event bytes. For a stream it first waits for the generation's first
event, so every failure that can happen before generation starts (no node,
queue full, bad argument) is raised as a FederationError while the caller can
still send a proper HTTP status; after that, errors become one SSE error
event followed by ``[DONE]``. What happened (tokens, timings, error) is
written to a :class:`ChatOutcome` for metrics, quota and audit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from federation.errors import ErrorCode, FederationError
from federation.inference.client import InferenceRouter
from federation.inference.types import GenerationEvent, GenerationFinished, TokenDelta
from gateway_http import transcripts
from gateway_http.chat.protocol import (
    DONE,
    ChatCall,
    ChunkWriter,
    completion_id,
    completion_object,
)
from gateway_http.errors import sse_error


@dataclass
class ChatOutcome:
    started: float
    stream: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    finished: GenerationFinished | None = None
    error: FederationError | None = None
    deltas_seen: int = 0
    prompt_seen: int | None = None
    """The prompt's tokens as the node reported them on the first delta."""
    completion_seen: int = 0
    """Tokens of the deltas received: what a generation cut before its end produced."""

    @property
    def prompt_tokens(self) -> int:
        return self.finished.prompt_tokens if self.finished else (self.prompt_seen or 0)

    @property
    def completion_tokens(self) -> int:
        return self.finished.completion_tokens if self.finished else self.completion_seen


class ChatServing:
    def __init__(self, router: InferenceRouter, timeout: float) -> None:
        self._router = router
        self._timeout = timeout

    async def create(self, call: ChatCall, outcome: ChatOutcome
                     ) -> dict[str, Any] | AsyncGenerator[bytes, None]:
        events = await transcripts.tap(  # stores opted-in tenants' transcripts (issue #7)
            call, self._router.generate(call.generation, deadline_seconds=self._timeout))
        if not call.stream:
            async with contextlib.aclosing(events):
                return await self._complete(call, events, outcome)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise FederationError(ErrorCode.UNAVAILABLE, "the generation ended early") from None
        except BaseException:
            await events.aclose()
            raise
        self._observe(first, outcome)
        return self._stream(call, first, events, outcome)

    def _observe(self, event: GenerationEvent, outcome: ChatOutcome) -> None:
        now = time.perf_counter()
        if isinstance(event, TokenDelta):
            if outcome.first_token_at is None:
                outcome.first_token_at = now
            outcome.deltas_seen += 1
            outcome.completion_seen += event.tokens
            if outcome.prompt_seen is None:
                outcome.prompt_seen = event.prompt_tokens
        else:
            outcome.finished, outcome.finished_at = event, now

    async def _complete(self, call: ChatCall, events: AsyncGenerator[GenerationEvent, None],
                        outcome: ChatOutcome) -> dict[str, Any]:
        parts: list[str] = []
        async for event in events:
            self._observe(event, outcome)
            if isinstance(event, TokenDelta):
                parts.append(event.text)
        if outcome.finished is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the generation ended early")
        return completion_object(completion_id(), call.generation.model, "".join(parts),
                                 outcome.finished)

    async def _stream(self, call: ChatCall, first: GenerationEvent,
                      events: AsyncGenerator[GenerationEvent, None], outcome: ChatOutcome
                      ) -> AsyncGenerator[bytes, None]:
        chunks = ChunkWriter(completion_id(), call.generation.model, call.include_usage)
        async with contextlib.aclosing(events):
            yield chunks.delta({"role": "assistant", "content": ""})
            try:
                event = first
                while True:
                    if isinstance(event, TokenDelta):
                        yield chunks.delta({"content": event.text})
                    else:
                        yield chunks.delta({}, event.finish_reason)
                        if call.include_usage:
                            yield chunks.usage(event)
                        break
                    event = await anext(events)
                    self._observe(event, outcome)
            except StopAsyncIteration:
                outcome.error = FederationError(ErrorCode.UNAVAILABLE,
                                                "the generation ended early")
                yield sse_error(outcome.error)
            except FederationError as exc:
                outcome.error = exc
                yield sse_error(exc)
            yield DONE
