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
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from federation.errors import INTERNAL_MESSAGE, ErrorCode, FederationError, call_error_to_proto
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
from federation.inference.deltas import joined
from federation.inference.metrics import InferenceLoadCollector
from federation.inference.types import (
    Embedding,
    GenerationEvent,
    GenerationFinished,
    TokenDelta,
)
from federation.inference.watchdog import StallWatchdog
from federation.interceptor import CountedOperation, recheck_caller
from federation.logs import clean_request_id, request_id_var
from federation.periodic import cancel_and_wait
from federation.prototime import duration
from federation.server import ServiceRegistration
from federation.telemetry import tracing
from federation.v1 import inference_pb2, inference_pb2_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = "federation.v1.InferenceService"
GENERATE_METHOD = f"/{SERVICE_NAME}/Generate"
"""What a generation on GenerateStream is counted and traced as: a Generate call."""
_END = object()
"""On a GenerateStream's queue: the caller closed its side and every generation ended."""
_DRAIN = object()
"""On a GenerateStream's queue: the node is stopping."""
log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: BackendSet, watchdog: StallWatchdog | None = None, *,
                 max_generations_per_stream: int = 256,
                 response_budget_bytes: int = 1024 * 1024) -> None:
        """``response_budget_bytes``: most bytes of messages one GenerateStream response
        gathers, well under gRPC's message limit (``grpc.max_message_bytes``, 4 MiB)."""
        self._backends = backends
        self._watchdog = watchdog or StallWatchdog.disabled()
        self._max_generations_per_stream = max(1, max_generations_per_stream)
        self._response_budget_bytes = response_budget_bytes
        self._streams: set[_GenerationStream] = set()

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
        async for response in self._generate(request):
            yield response

    async def _generate(self, request: inference_pb2.GenerateRequest
                        ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self._watchdog.refuse_if_wedged()
        started = time.perf_counter()
        coalescer = _Coalescer(self._backends.generate(request_from_pb(request)))
        with self._watchdog.generation(coalescer.fail) as progress:
            coalescer.on_event = progress
            async for response in _responses(coalescer, started):
                yield response

    async def GenerateStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[inference_pb2.GenerateStreamRequest],
        context: Context,
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        # Each generation runs in a task of its own and puts its messages on the
        # stream's queue; this handler writes them in order of arrival. The interceptor
        # authenticated the caller once, for the stream; each start checks again.
        stream = _GenerationStream(self, self._max_generations_per_stream,
                                   self._response_budget_bytes)
        self._streams.add(stream)
        try:
            async for message in stream.messages(request_iterator):
                yield message
        finally:
            self._streams.discard(stream)

    def drain(self) -> None:
        """The node is stopping: every open GenerateStream starts no more generations and
        ends (UNAVAILABLE, so the caller reconnects elsewhere) once its running ones are
        done; an idle stream ends at once instead of holding the graceful stop."""
        for stream in self._streams:
            stream.drain()

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


class _GenerationStream:
    """The node's side of one GenerateStream: generations started and cancelled by id,
    their messages interleaved on the stream."""

    def __init__(self, servicer: InferenceServicer, max_running: int,
                 response_budget_bytes: int) -> None:
        self._servicer = servicer
        self._max_running = max_running
        self._response_budget = response_budget_bytes
        self._out: asyncio.Queue[object] = asyncio.Queue()
        self._carried: inference_pb2.GenerationMessage | None = None
        """A message left for the next response (the last one was full)."""
        self._running: dict[int, asyncio.Task[None]] = {}
        self._drain_asked = False
        self._draining = False
        self._ended = False

    def drain(self) -> None:
        self._out.put_nowait(_DRAIN)

    async def _ready(self) -> inference_pb2.GenerateStreamResponse:
        """The messages queued by now (waiting for one), in one response of at most the
        budget's bytes (a single larger message goes alone): a write per message would
        cost the node and the caller a wakeup each."""
        ready = inference_pb2.GenerateStreamResponse()
        size = 0
        item: object
        if self._carried is not None:
            item, self._carried = self._carried, None
        else:
            item = await self._out.get()
        while True:
            if item is _END:
                self._ended = True
            elif item is _DRAIN:
                self._drain_asked = True
            else:
                assert isinstance(item, inference_pb2.GenerationMessage)
                item_size = item.ByteSize()
                if ready.messages and size + item_size > self._response_budget:
                    self._carried = item
                    return ready
                ready.messages.append(item)
                size += item_size
            if self._out.empty():
                return ready
            item = self._out.get_nowait()

    async def messages(self, requests: AsyncIterator[inference_pb2.GenerateStreamRequest]
                       ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                if (self._draining and not self._running and self._out.empty()
                        and self._carried is None):
                    raise FederationError(ErrorCode.UNAVAILABLE,
                                          "the inference node is shutting down; reconnect",
                                          retry_after_seconds=1.0)
                ready = await self._ready()
                if ready.messages:
                    yield ready
                if self._ended:
                    return
                if self._drain_asked and not self._draining:
                    self._draining = True
                    await cancel_and_wait(reader)  # no new generations; the running ones end
        finally:
            await cancel_and_wait(reader)
            for task in list(self._running.values()):
                task.cancel()

    async def _read(self, requests: AsyncIterator[inference_pb2.GenerateStreamRequest]
                    ) -> None:
        async for request in requests:
            generation_id = request.generation_id
            if request.WhichOneof("action") == "cancel":
                running = self._running.get(generation_id)
                if running is not None:
                    running.cancel()
            elif request.HasField("start"):
                self._start(generation_id, request.start)
        # The caller has closed its side: the stream ends when its generations have.
        while self._running:  # wait, not gather: cancelling this must not cancel them
            await asyncio.wait(list(self._running.values()))
        self._out.put_nowait(_END)

    def _start(self, generation_id: int, start: inference_pb2.GenerateStart) -> None:
        refusal = None
        if generation_id in self._running:
            refusal = FederationError(ErrorCode.ALREADY_EXISTS,
                                      f"generation {generation_id} is already running",
                                      param="generation_id")
        elif len(self._running) >= self._max_running:
            refusal = FederationError(ErrorCode.RESOURCE_EXHAUSTED,
                                      f"{self._max_running} generations already run on this "
                                      "stream", retry_after_seconds=1.0)
        if refusal is not None:
            self._out.put_nowait(_stream_error(generation_id, refusal))
            return
        self._running[generation_id] = asyncio.create_task(
            self._generation(generation_id, start))

    async def _generation(self, generation_id: int, start: inference_pb2.GenerateStart
                          ) -> None:
        """Put the generation's messages on the stream; its last one is its finished event
        or its error. A cancelled generation sends nothing more."""
        # As the interceptor treats a call's x-request-id: a caller's id that is not short
        # printable ASCII (a NUL, a newline, a megabyte) never reaches logs and traces.
        request_id_var.set(clean_request_id(start.request_id))
        counted = CountedOperation(GENERATE_METHOD)
        error: FederationError | None = None
        try:
            carrier = dict(start.trace_context) if tracing.enabled() else None
            with tracing.span(GENERATE_METHOD.lstrip("/"), kind=SpanKind.SERVER,
                              carrier=carrier):
                recheck_caller()  # the stream may outlive the caller's certificate
                async with asyncio.timeout(_seconds(start) if start.HasField("timeout")
                                           else None):
                    async for response in self._servicer._generate(start.request):
                        self._out.put_nowait(inference_pb2.GenerationMessage(
                            generation_id=generation_id, response=response))
        except asyncio.CancelledError:
            counted.end(None, cancelled=True)
            raise
        except FederationError as exc:
            error = exc
        except TimeoutError:
            error = FederationError(ErrorCode.DEADLINE_EXCEEDED,
                                    "the generation ran past its deadline")
        except Exception:
            log.exception("generation failed", extra={"generation_id": generation_id})
            error = FederationError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)
        finally:
            # In the same step as its last message: the writer never sees the last
            # message of a generation still counted as running.
            self._running.pop(generation_id, None)
        if error is not None:
            self._out.put_nowait(_stream_error(generation_id, error))
        counted.end(error)


def _stream_error(generation_id: int, error: FederationError
                  ) -> inference_pb2.GenerationMessage:
    return inference_pb2.GenerationMessage(generation_id=generation_id,
                                           error=call_error_to_proto(error))


def _seconds(start: inference_pb2.GenerateStart) -> float:
    return start.timeout.seconds + start.timeout.nanos / 1e9


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
                batches, self._deltas = joined(self._deltas), []
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




def registration(servicer: InferenceServicer) -> ServiceRegistration:
    return ServiceRegistration.of(
        SERVICE_NAME, inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer,
        on_drain=servicer.drain)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    config = runtime.settings.inference
    backends = build_backend_set(config)
    # Registered first: a backend that fails to start must not leak the others.
    runtime.cleanup.push_async_callback(backends.stop)
    await backends.start()
    runtime.registry.register(InferenceLoadCollector(backends.load))
    count_file = runtime.settings.home / config.stall_count_file.format(
        node=runtime.settings.node_name)
    watchdog = StallWatchdog(config.stall_timeout_seconds, config.stall_exit_after_seconds,
                             lambda: runtime.set_serving(False), registry=runtime.registry,
                             count_file=count_file)
    await watchdog.start()
    runtime.cleanup.push_async_callback(watchdog.stop)
    return registration(InferenceServicer(
        backends, watchdog, max_generations_per_stream=config.stream_max_generations,
        response_budget_bytes=runtime.settings.grpc.max_message_bytes // 4))
