"""The inference node's gRPC service: a thin adapter over a :class:`BackendSet`.

Generate forwards each delta as soon as the backend produces it; deltas produced
while the previous message was being sent travel together in one message (see
:class:`_Coalescer`), so ``TokenDelta.index`` counts messages, not tokens. Embed
forwards each input's vector as the backend produces it. If the caller cancels,
grpc.aio cancels this handler's task; the cancellation reaches the backend's
iterator, which stops the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc

from federation.errors import ErrorCode, FederationError
from federation.inference.backend import BackendSet, build_backend_set
from federation.inference.convert import (
    delta_to_pb,
    embed_request_from_pb,
    embedding_to_pb,
    embeddings_finished_to_pb,
    finished_to_pb,
    model_to_pb,
    request_from_pb,
)
from federation.inference.metrics import InferenceLoadCollector
from federation.inference.types import (
    Embedding,
    GenerationEvent,
    GenerationFinished,
    TokenDelta,
    ToolCallDelta,
)
from federation.inference.watchdog import StallWatchdog
from federation.periodic import cancel_and_wait
from federation.prototime import duration
from federation.server import ServiceRegistration
from federation.v1 import inference_pb2, inference_pb2_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = "federation.v1.InferenceService"

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: BackendSet, watchdog: StallWatchdog | None = None) -> None:
        self._backends = backends
        self._watchdog = watchdog or StallWatchdog.disabled()

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[model_to_pb(m) for m in self._backends.models()]
        )

    async def GetLoad(
        self, request: inference_pb2.GetLoadRequest, context: Context
    ) -> inference_pb2.GetLoadResponse:
        load = self._backends.load()
        return inference_pb2.GetLoadResponse(
            in_flight=load.in_flight, queued=load.queued, queue_capacity=load.capacity
        )

    async def Generate(  # type: ignore[override]
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self._watchdog.refuse_if_wedged()
        started = time.perf_counter()
        coalescer = _Coalescer(self._backends.generate(request_from_pb(request)))
        with self._watchdog.generation(coalescer.fail) as progress:
            coalescer.on_event = progress
            async for response in _responses(coalescer, started):
                yield response

    async def Embed(  # type: ignore[override]
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> AsyncIterator[inference_pb2.EmbedResponse]:
        self._watchdog.refuse_if_wedged()
        events = self._backends.embed(embed_request_from_pb(request))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Embedding):
                    yield inference_pb2.EmbedResponse(embedding=embedding_to_pb(event))
                else:
                    yield inference_pb2.EmbedResponse(finished=embeddings_finished_to_pb(event))
                    return
        raise FederationError(ErrorCode.INTERNAL, "the backend ended without finishing")


async def _responses(coalescer: _Coalescer, started: float
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
    first_token: float | None = None
    index = 0
    async with coalescer as batches:
        async for batch in batches:
            if isinstance(batch, TokenDelta):
                if first_token is None:
                    first_token = time.perf_counter() - started
                yield inference_pb2.GenerateResponse(delta=delta_to_pb(batch, index))
                index += 1
                continue
            finished = finished_to_pb(batch)
            finished.total_time.CopyFrom(duration(time.perf_counter() - started))
            ttft = first_token if first_token is not None else time.perf_counter() - started
            finished.time_to_first_token.CopyFrom(duration(ttft))
            yield inference_pb2.GenerateResponse(finished=finished)
            return


class _Coalescer:
    """Reads a generation in its own task and hands over what has piled up since the
    last message: every delta produced meanwhile, joined into one (text concatenated,
    tokens summed, the first delta's prompt count kept), and then the
    ``GenerationFinished``.

    A delta is sent as soon as the previous message has been handed to gRPC, so a
    slow backend's tokens go out one by one, with no added delay; when the backend
    is faster than the stream (or produces several tokens at once), several tokens
    share one message instead of paying gRPC's per-message cost each. The first
    delta is never delayed: the consumer wakes at the first event.

    Errors of the generation are raised from the iteration; leaving the ``async
    with`` (done, cancelled or failed) cancels the reader, which closes the
    backend's iterator, which stops the generation.
    """

    def __init__(self, events: AsyncGenerator[GenerationEvent, None]) -> None:
        self._events = events
        self._deltas: list[TokenDelta] = []
        self._end: GenerationFinished | Exception | None = None
        self._ready = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.on_event: Callable[[], None] = _nothing
        """Called at each event the backend produces (the watchdog's sign of progress)."""

    def fail(self, error: Exception) -> None:
        """End the stream with ``error`` now, whatever the backend is doing (the
        watchdog's verdict on a wedged generation)."""
        if self._end is None:
            self._end = error
            self._ready.set()

    async def __aenter__(self) -> AsyncIterator[TokenDelta | GenerationFinished]:
        self._reader = asyncio.create_task(self._read())  # copies the request-id context
        return self._batches()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._reader is not None
        await cancel_and_wait(self._reader)  # a no-op cancel once it has ended

    async def _read(self) -> None:
        try:
            async with contextlib.aclosing(self._events):
                async for event in self._events:
                    self.on_event()
                    if isinstance(event, TokenDelta):
                        self._deltas.append(event)
                        self._ready.set()
                    else:
                        self._end = event
                        break
        except Exception as exc:  # handed to the consumer, which raises it
            self._end = self._end or exc
        else:
            if self._end is None:
                self._end = FederationError(ErrorCode.INTERNAL,
                                            "the backend ended without finishing")
        finally:
            self._ready.set()

    async def _batches(self) -> AsyncIterator[TokenDelta | GenerationFinished]:
        while True:
            await self._ready.wait()
            self._ready.clear()
            # Deltas that arrived while a batch was being sent go out before the end,
            # which may have arrived meanwhile too.
            while self._deltas:
                batches, self._deltas = _joined(self._deltas), []
                for batch in batches:
                    yield batch
            end = self._end
            if isinstance(end, Exception):
                raise end
            if end is not None:
                yield end
                return


def _nothing() -> None:
    return None


def _joined(deltas: list[TokenDelta]) -> list[TokenDelta]:
    """Consecutive deltas as one (an echoed prompt kept apart from generated text)."""
    groups: list[list[TokenDelta]] = []
    for delta in deltas:
        if groups and groups[-1][0].echo == delta.echo:
            groups[-1].append(delta)
        else:
            groups.append([delta])
    return [_join(group) for group in groups]


def _join(deltas: list[TokenDelta]) -> TokenDelta:
    if len(deltas) == 1:
        return deltas[0]
    prompt = next((d.prompt_tokens for d in deltas if d.prompt_tokens is not None), None)
    return TokenDelta("".join(d.text for d in deltas), sum(d.tokens for d in deltas), prompt,
                      tool_calls=_joined_calls(deltas),
                      logprobs=tuple(lp for d in deltas for lp in d.logprobs),
                      echo=deltas[0].echo)


def _joined_calls(deltas: list[TokenDelta]) -> tuple[ToolCallDelta, ...]:
    """Tool-call pieces in order; a piece that continues the previous one's call (same
    index, no id of its own) is appended to it."""
    calls: list[ToolCallDelta] = []
    for piece in (c for d in deltas for c in d.tool_calls):
        last = calls[-1] if calls else None
        if last is not None and last.index == piece.index and not piece.id:
            calls[-1] = ToolCallDelta(last.index, last.id, last.name or piece.name,
                                      last.arguments + piece.arguments)
        else:
            calls.append(piece)
    return tuple(calls)


def registration(servicer: InferenceServicer) -> ServiceRegistration:
    return ServiceRegistration.of(
        SERVICE_NAME, inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    config = runtime.settings.inference
    backends = build_backend_set(config)
    # Registered first: a backend that fails to start must not leak the others.
    runtime.cleanup.push_async_callback(backends.stop)
    await backends.start()
    runtime.registry.register(InferenceLoadCollector(backends.load))
    watchdog = StallWatchdog(config.stall_timeout_seconds, config.stall_exit_after_seconds,
                             lambda: runtime.set_serving(False), registry=runtime.registry)
    await watchdog.start()
    runtime.cleanup.push_async_callback(watchdog.stop)
    return registration(InferenceServicer(backends, watchdog))
