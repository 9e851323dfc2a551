"""GenerateStream: many generations on one long-lived stream per node, over real mTLS.

The router's own behaviour (retries, failover, cancellation) is tested through it in
``test_inference_node.py``; here, what a multiplexed stream adds: generations that
share a stream without mixing, each one counted as a Generate call, refusals of one
generation that leave the others running, a deadline enforced per generation, and a
node that stops ending its streams once their generations are done."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from federation.config import GrpcConfig
from federation.errors import ErrorCode, FederationError, call_error_from_proto
from federation.inference.backend import BackendSet
from federation.inference.client import InferenceRouter
from federation.inference.streams import GenerationStream
from federation.inference.test_backend import TestBackend
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from federation.server import NodeServer
from federation.v1 import inference_pb2, inference_pb2_grpc
from nodes.inference import InferenceServicer, registration
from tests.gateway_support import InferenceNode, eventually, inference_nodes
from tests.support import TestPKI

MODEL = "test-model"
GENERATE = {"grpc_service": "federation.v1.InferenceService", "grpc_method": "Generate"}


def chat(text: str) -> GenerationRequest:
    return GenerationRequest(MODEL, (ChatMessage("user", text),), SamplingParams())


async def text_of(events: AsyncIterator[object]) -> str:
    text = ""
    async for event in events:
        if isinstance(event, TokenDelta):
            text += event.text
        else:
            assert isinstance(event, GenerationFinished)
            return text
    raise AssertionError("no GenerationFinished")


@contextlib.asynccontextmanager
async def routed(pki: TestPKI, node: InferenceNode) -> AsyncIterator[InferenceRouter]:
    """The gateway's router to ``node`` alone."""
    router = InferenceRouter([node.address], pki.identity("gateway"), GrpcConfig(),
                             refresh_seconds=60)
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


def start(generation_id: int, text: str) -> inference_pb2.GenerateStreamRequest:
    return inference_pb2.GenerateStreamRequest(
        generation_id=generation_id, start=inference_pb2.GenerateStart(
            request=inference_pb2.GenerateRequest(model=MODEL, messages=[
                inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content=text)])))


async def messages_until_done(call: object, ids: set[int], *, errors_end: bool = True
                              ) -> dict[int, list[inference_pb2.GenerationMessage]]:
    """Every message of generations ``ids``, read until each has finished (or failed,
    with ``errors_end``)."""
    seen: dict[int, list[inference_pb2.GenerationMessage]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        response = await call.read()  # type: ignore[attr-defined]
        assert response is not grpc.aio.EOF
        for message in response.messages:
            seen[message.generation_id].append(message)
            if (errors_end and message.HasField("error")) or message.response.HasField(
                    "finished"):
                open_ids.discard(message.generation_id)
    return seen


async def test_concurrent_generations_share_one_stream_without_mixing(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.002)
    async with inference_nodes(pki, [backend]) as (node,), routed(pki, node) as router:
        texts = [" ".join(f"w{n}-{i}" for i in range(5)) for n in range(20)]
        answers = await asyncio.gather(*(text_of(router.generate(chat(t))) for t in texts))
        registry = node.server.registry
        streams_open = registry.get_sample_value(
            "federation_grpc_server_in_flight",
            {"grpc_service": GENERATE["grpc_service"], "grpc_method": "GenerateStream"})
    assert answers == texts
    assert streams_open == 1
    # Each generation counted as the Generate call it replaces (dashboards, alerts).
    assert registry.get_sample_value("federation_grpc_server_handled_total",
                                     {**GENERATE, "grpc_code": "OK"}) == 20


async def test_a_refused_start_leaves_the_other_generations_running(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.01)
    async with inference_nodes(pki, [backend]) as (node,):
        channel = pki.channel(node.address, "gateway")
        call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream()
        await call.write(start(1, "one two three"))
        await call.write(start(1, "the same id again"))
        await call.write(inference_pb2.GenerateStreamRequest(
            generation_id=99, cancel=inference_pb2.GenerateCancel()))  # not running: ignored
        await call.write(start(2, "four five"))
        # The refusal names id 1 too: the generation running under it goes on.
        seen = await messages_until_done(call, {1, 2}, errors_end=False)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
        await channel.close()
    refusal = next(m for m in seen[1] if m.HasField("error"))
    error = call_error_from_proto(refusal.error)
    assert (error.code, error.param) == (ErrorCode.ALREADY_EXISTS, "generation_id")
    for generation_id, text in ((1, "one two three"), (2, "four five")):
        deltas = [m.response.delta.text for m in seen[generation_id]
                  if m.HasField("response") and m.response.HasField("delta")]
        assert "".join(deltas) == text
        assert seen[generation_id][-1].response.finished.finish_reason == (
            inference_pb2.FINISH_REASON_STOP)


async def test_a_generations_request_id_is_cleaned_as_a_calls_is(pki: TestPKI) -> None:
    # A Generate call's x-request-id goes through the interceptor's clean_request_id; a
    # start's request_id went to the logs and traces of its generation as sent.
    backend = TestBackend()
    sent = {1: "req-ok", 2: "bad\nid", 3: "x" * 5000, 4: "", 5: "nul\x00"}
    async with inference_nodes(pki, [backend]) as (node,):
        channel = pki.channel(node.address, "gateway")
        call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream()
        for generation_id, request_id in sent.items():
            message = start(generation_id, "hello")
            message.start.request_id = request_id
            await call.write(message)
            await messages_until_done(call, {generation_id})
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        await channel.close()
    assert backend.request_ids[0] == "req-ok"
    for minted in backend.request_ids[1:]:
        assert minted.startswith("req_") and len(minted) <= 128 and minted.isprintable()
    assert len(set(backend.request_ids)) == len(sent)


async def test_a_start_whose_caller_goes_away_before_it_is_written_is_not_left_open(
    pki: TestPKI,
) -> None:
    # Starts take turns writing on the stream. A caller cancelled while waiting its turn
    # (an HTTP client gone under load) never got its generation back to cancel it, and
    # the stream kept it open for ever: once retired (a renewed certificate), the stream
    # never closed.
    backend = TestBackend()
    async with inference_nodes(pki, [backend]) as (node,):
        channel = pki.channel(node.address, "gateway")
        stream = GenerationStream(inference_pb2_grpc.InferenceServiceStub(channel), epoch=0)
        request = start(1, "never generated").start.request
        async with stream._writing:  # another generation's start being written
            starting = asyncio.create_task(stream.start(request, None))
            await asyncio.sleep(0)  # it waits for its turn
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
        stream.retire()
        await eventually(lambda: stream.ended)  # no generation is open: it closes
        await channel.close()
    assert backend.started == 0


async def test_a_generation_past_its_deadline_is_stopped_on_the_node(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.2)
    async with inference_nodes(pki, [backend]) as (node,), routed(pki, node) as router:
        with pytest.raises(FederationError) as late:
            await text_of(router.generate(chat("a b c d e f g h"), deadline_seconds=0.5))
        await eventually(lambda: backend.in_flight == 0)
        # The stream itself is fine: the next generation goes through.
        backend.token_delay = 0.0
        after = await text_of(router.generate(chat("after")))
    assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert backend.cancelled == 1
    assert after == "after"


async def test_a_stream_refuses_generations_past_its_limit(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.05)
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([backend]), max_generations_per_stream=1))],
        trust_domain=pki.ca.trust_domain, grpc_config=GrpcConfig(grace_seconds=0.5),
        listen="127.0.0.1:0", credentials=pki.identity("inference", "limited"),
        metrics_port=None)
    await server.start()
    channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
    try:
        call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream()
        await call.write(start(1, "a b c"))
        await call.write(start(2, "d e f"))
        seen = await messages_until_done(call, {1, 2})
        call.cancel()
    finally:
        await channel.close()
        await server.stop(0)
    assert seen[1][-1].response.finished.finish_reason == inference_pb2.FINISH_REASON_STOP
    refused = call_error_from_proto(seen[2][0].error)
    assert refused.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "1 generations already run on this stream" in refused.message


async def test_a_stopping_node_finishes_its_generations_then_ends_the_stream(
        pki: TestPKI) -> None:
    """The graceful stop waits for the running generation (not for the whole grace, and
    not for an idle stream), and the stream then ends UNAVAILABLE: the caller reconnects
    elsewhere."""
    backend = TestBackend(token_delay=0.1)
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([backend])))],
        trust_domain=pki.ca.trust_domain, grpc_config=GrpcConfig(grace_seconds=30),
        listen="127.0.0.1:0", credentials=pki.identity("inference", "draining"),
        metrics_port=None)
    await server.start()
    channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        idle = stub.GenerateStream()
        busy = stub.GenerateStream()
        await idle.write(start(1, "x"))
        await messages_until_done(idle, {1})
        await busy.write(start(1, "one two three four five"))
        first = await busy.read()
        assert isinstance(first, inference_pb2.GenerateStreamResponse)
        assert first.messages[0].response.HasField("delta")
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop(30))
        rest = await messages_until_done(busy, {1})
        await stopping
        stopped_in = time.monotonic() - started
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await busy.read()
        idle_code = await idle.code()
    finally:
        await channel.close()
    assert rest[1][-1].response.finished.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert stopped_in < 5, stopped_in
    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (ended.value.details() or "")
    assert idle_code is grpc.StatusCode.UNAVAILABLE


async def test_messages_ready_together_share_responses_up_to_a_byte_budget(
        pki: TestPKI) -> None:
    """Messages queued at once travel in one response (a generation's last delta with
    its finished event), but never more bytes in one than the budget, which keeps
    responses under gRPC's message limit however many generations pile up."""
    backend = TestBackend(first_token_delay=0.1)  # all eight produce at the same moment
    budget = 400
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([backend]), response_budget_bytes=budget))],
        trust_domain=pki.ca.trust_domain, grpc_config=GrpcConfig(grace_seconds=0.5),
        listen="127.0.0.1:0", credentials=pki.identity("inference", "budget"),
        metrics_port=None)
    await server.start()
    channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
    texts = {n: " ".join(f"t{n}w{i}" for i in range(30)) for n in range(1, 9)}
    responses: list[inference_pb2.GenerateStreamResponse] = []
    try:
        call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream()
        for generation_id, text in texts.items():
            await call.write(start(generation_id, text))
        finished: set[int] = set()
        while len(finished) < len(texts):
            response = await call.read()
            assert isinstance(response, inference_pb2.GenerateStreamResponse)
            responses.append(response)
            finished |= {m.generation_id for m in response.messages
                         if m.response.HasField("finished")}
        call.cancel()
    finally:
        await channel.close()
        await server.stop(0)
    sizes = [sum(m.ByteSize() for m in r.messages) for r in responses]
    assert all(size <= budget or len(r.messages) == 1
               for size, r in zip(sizes, responses, strict=True)), sizes
    assert any(len(r.messages) > 1 for r in responses)  # some did travel together
    for generation_id, text in texts.items():
        deltas = [m.response.delta.text for r in responses for m in r.messages
                  if m.generation_id == generation_id and m.response.HasField("delta")]
        assert "".join(deltas) == text
