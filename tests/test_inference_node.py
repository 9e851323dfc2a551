"""The inference node over real mTLS, and the router that spreads calls across nodes."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from federation.config import GrpcConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.client import InferenceRouter
from federation.inference.test_backend import TestBackend
from federation.inference.types import (
    ChatMessage,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    SamplingParams,
    TokenDelta,
)
from federation.v1 import inference_pb2, inference_pb2_grpc
from tests.gateway_support import InferenceNode, eventually, inference_nodes
from tests.support import TestPKI

MODEL = "test-model"


def chat(text: str, model: str = MODEL, **sampling: object) -> GenerationRequest:
    return GenerationRequest(model, (ChatMessage("user", text),),
                             SamplingParams(**sampling))  # type: ignore[arg-type]


async def drain(events: AsyncIterator[GenerationEvent]) -> tuple[str, GenerationFinished]:
    text = ""
    async for event in events:
        if isinstance(event, TokenDelta):
            text += event.text
        else:
            return text, event
    raise AssertionError("no GenerationFinished")


until = eventually


@pytest.fixture
async def router_factory(pki: TestPKI) -> AsyncIterator[object]:
    routers: list[InferenceRouter] = []

    async def make(nodes: list[InferenceNode], **kwargs: object) -> InferenceRouter:
        router = InferenceRouter([n.address for n in nodes], pki.identity("gateway"),
                                 GrpcConfig(), refresh_seconds=60, **kwargs)  # type: ignore[arg-type]
        await router.start()
        routers.append(router)
        return router

    yield make
    for router in routers:
        await router.stop()


# ---- the servicer over mTLS ---------------------------------------------------------------------

async def test_generate_streams_deltas_then_usage(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend()]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        request = inference_pb2.GenerateRequest(
            model=MODEL, messages=[inference_pb2.ChatMessage(
                role=inference_pb2.CHAT_ROLE_USER, content="red green blue")])
        responses = [r async for r in stub.Generate(request)]
        # A zero-delay backend produces every token before the first message is
        # sent: they travel together in one delta.
        assert [r.delta.text for r in responses[:-1]] == ["red green blue"]
        assert [r.delta.index for r in responses[:-1]] == [0]
        # The joined delta counts its three tokens and carries the prompt's count.
        assert (responses[0].delta.tokens, responses[0].delta.prompt_tokens) == (3, 4)
        finished = responses[-1].finished
        assert finished.finish_reason == inference_pb2.FINISH_REASON_STOP
        assert (finished.usage.completion_tokens, finished.usage.total_tokens) == (3, 7)
        assert finished.total_time.ToNanoseconds() >= finished.time_to_first_token.ToNanoseconds()


async def test_generate_sends_slow_tokens_one_message_each(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend(token_delay=0.02)]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        request = inference_pb2.GenerateRequest(
            model=MODEL, messages=[inference_pb2.ChatMessage(
                role=inference_pb2.CHAT_ROLE_USER, content="red green blue")])
        responses = [r async for r in stub.Generate(request)]
        assert [r.delta.text for r in responses[:-1]] == ["red", " green", " blue"]
        assert [r.delta.index for r in responses[:-1]] == [0, 1, 2]
        assert [r.delta.tokens for r in responses[:-1]] == [1, 1, 1]
        assert [r.delta.HasField("prompt_tokens") for r in responses[:-1]] == [True, False, False]
        assert responses[-1].HasField("finished")


async def test_generate_sends_tokens_before_a_mid_stream_failure(pki: TestPKI) -> None:
    backend = TestBackend()
    backend.fail_after_tokens = 2
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        call = stub.Generate(inference_pb2.GenerateRequest(
            model=MODEL, messages=[inference_pb2.ChatMessage(
                role=inference_pb2.CHAT_ROLE_USER, content="red green blue")]))
        first = await call.read()
        assert isinstance(first, inference_pb2.GenerateResponse)
        assert first.delta.text == "red green"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        await until(lambda: backend.in_flight == 0)


async def test_list_models_and_load(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.05)
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        listed = await stub.ListModels(inference_pb2.ListModelsRequest())
        assert [(m.id, m.backend) for m in listed.models] == [(MODEL, "test")]
        call = stub.Generate(inference_pb2.GenerateRequest(model=MODEL, messages=[
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="a b c")]))
        await call.read()
        load = await stub.GetLoad(inference_pb2.GetLoadRequest())
        assert (load.in_flight, load.queue_capacity) == (1, 64)
        call.cancel()


async def test_client_cancel_stops_backend(pki: TestPKI) -> None:
    backend = TestBackend(token_delay=0.05)
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        call = stub.Generate(inference_pb2.GenerateRequest(model=MODEL, messages=[
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="x " * 100)]))
        await call.read()
        call.cancel()
        await until(lambda: backend.in_flight == 0)
        assert (backend.cancelled, backend.completed) == (1, 0)


async def test_bad_requests_map_to_status(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend()]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(inference_pb2.GenerateRequest(model=MODEL)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers: list[Any] = list(caught.value.trailing_metadata() or ())
        assert ("error-param", "messages") in [tuple(m) for m in trailers]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(inference_pb2.GenerateRequest(
                    model="nope", messages=[inference_pb2.ChatMessage(
                        role=inference_pb2.CHAT_ROLE_USER, content="hi")])):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _user_request(**fields: Any) -> inference_pb2.GenerateRequest:
    role = fields.pop("role", inference_pb2.CHAT_ROLE_USER)
    return inference_pb2.GenerateRequest(model=MODEL, messages=[
        inference_pb2.ChatMessage(role=role, content="hi")], **fields)


def _sampling(**values: float) -> inference_pb2.SamplingParams:
    return inference_pb2.SamplingParams(**values)


async def test_values_outside_the_protos_ranges_are_refused_naming_the_field(
    pki: TestPKI,
) -> None:
    # proto3 keeps an enum number it does not define, and SamplingParams documents
    # ranges: both used to be served (an unknown format as free text, an unknown tool
    # choice as AUTO, a NaN temperature handed to the model).
    cases = [
        (_user_request(role=9), "messages[0].role"),
        (_user_request(response_format=inference_pb2.ResponseFormat(type=9)),  # type: ignore[arg-type]
         "response_format.type"),
        (_user_request(tool_choice=inference_pb2.ToolChoice(mode=9)),  # type: ignore[arg-type]
         "tool_choice.mode"),
        (_user_request(sampling=_sampling(temperature=math.nan)), "temperature"),
        (_user_request(sampling=_sampling(temperature=-0.5)), "temperature"),
        (_user_request(sampling=_sampling(temperature=2.5)), "temperature"),
        (_user_request(sampling=_sampling(top_p=0.0)), "top_p"),
        (_user_request(sampling=_sampling(top_p=1.5)), "top_p"),
        (_user_request(sampling=_sampling(repeat_penalty=0.0)), "repeat_penalty"),
        (_user_request(sampling=_sampling(presence_penalty=-2.5)), "presence_penalty"),
        (_user_request(sampling=_sampling(frequency_penalty=math.inf)), "frequency_penalty"),
    ]
    backend = TestBackend()
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "council"))
        for request, param in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(request):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, param
            trailers = dict(caught.value.trailing_metadata() or ())
            assert trailers["error-param"] == param, caught.value.details()
        assert backend.completed == 0
        # The bounds themselves are allowed.
        edges = _sampling(temperature=0.0, top_p=1.0, repeat_penalty=10.0,
                          presence_penalty=-2.0, frequency_penalty=2.0)
        responses = [r async for r in stub.Generate(_user_request(sampling=edges))]
    assert responses[-1].HasField("finished")


def _nested(levels: int) -> str:
    """A JSON Schema ``levels`` schemas deep (a property in a property ...): each adds
    two levels of nesting, the schema and its ``properties``."""
    return '{"type": "object", "properties": {"a": ' * (levels - 1) + "{}" + "}}" * (levels - 1)


async def test_schemas_that_cannot_be_parsed_or_are_too_deep_are_invalid_not_internal(
    pki: TestPKI,
) -> None:
    # json.loads raises RecursionError, not ValueError, on a document nested past its
    # limit: a tool's parameters of 100000 "[" failed the call as INTERNAL; a response
    # format's schema was not looked at by the node at all (each backend tripped on it).
    def tool(parameters: str) -> inference_pb2.GenerateRequest:
        return _user_request(tools=[inference_pb2.Tool(name="f",
                                                       parameters_json_schema=parameters)])

    def schema(text: str) -> inference_pb2.GenerateRequest:
        return _user_request(response_format=inference_pb2.ResponseFormat(
            type=inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=text))

    cases = [
        (tool("[" * 100_000), "tools[0].function.parameters"),
        (tool(_nested(200)), "tools[0].function.parameters"),
        (schema("[" * 100_000), "response_format"),
        (schema(_nested(200)), "response_format"),
        (schema("{not json"), "response_format"),
        (schema("[]"), "response_format"),
    ]
    backend = TestBackend()
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        for request, param in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.Generate(request):
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, param
            assert dict(caught.value.trailing_metadata() or ())["error-param"] == param
        assert backend.started == 0
        fine = [r async for r in stub.Generate(schema(_nested(32)))]  # 63 levels
        also_fine = [r async for r in stub.Generate(tool(_nested(32)))]
    assert fine[-1].HasField("finished") and also_fine[-1].HasField("finished")


async def test_edge_devices_may_not_generate(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend()]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "edge"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListModels(inference_pb2.ListModelsRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- the router ---------------------------------------------------------------------------------

async def test_router_spreads_concurrent_calls(pki: TestPKI, router_factory: object) -> None:
    backends = [TestBackend(token_delay=0.02), TestBackend(token_delay=0.02)]
    async with inference_nodes(pki, backends) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        assert [m.id for m in router.list_models()] == [MODEL]
        results = await asyncio.gather(*(drain(router.generate(chat("a b c"))) for _ in range(4)))
        assert all(text == "a b c" for text, _ in results)
        assert [b.completed for b in backends] == [2, 2]


async def test_router_retries_before_first_token(pki: TestPKI, router_factory: object) -> None:
    broken, healthy = TestBackend(), TestBackend()
    broken.fail_before_first = FederationError(ErrorCode.UNAVAILABLE, "warming up")
    async with inference_nodes(pki, [broken, healthy]) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        for _ in range(3):
            text, _ = await drain(router.generate(chat("hello there")))
            assert text == "hello there"
        assert healthy.completed == 3
        assert router.upstream_errors >= 1


async def test_router_does_not_retry_bad_requests(pki: TestPKI, router_factory: object) -> None:
    backends = [TestBackend(), TestBackend()]
    async with inference_nodes(pki, backends) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        with pytest.raises(FederationError) as caught:
            await drain(router.generate(chat("hi", max_tokens=0)))
        assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_ARGUMENT,
                                                           "max_tokens")
        assert all(node.healthy for node in router.nodes)
        with pytest.raises(FederationError) as caught:
            await drain(router.generate(chat("hi", model="unknown")))
        assert caught.value.code is ErrorCode.NOT_FOUND


async def test_a_token_budget_travels_to_the_node(pki: TestPKI, router_factory: object
                                                 ) -> None:
    backends = [TestBackend(), TestBackend()]
    async with inference_nodes(pki, backends) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        words = "one two three four five six"  # 7 prompt tokens
        text, finished = await drain(router.generate(replace(chat(words), token_budget=10)))
        assert (text, finished.finish_reason, finished.total_tokens) == (
            "one two three", "length", 10)
        # A prompt the budget cannot hold: refused as insufficient quota (the code survives
        # the trip through gRPC), and not retried elsewhere: the request's budget is short,
        # not the node.
        with pytest.raises(FederationError) as caught:
            await drain(router.generate(replace(chat(words), token_budget=7)))
        assert caught.value.code is ErrorCode.INSUFFICIENT_QUOTA
        assert router.upstream_errors == 0
        assert all(node.healthy for node in router.nodes)


async def test_node_dying_mid_stream(pki: TestPKI, router_factory: object) -> None:
    backends = [TestBackend(token_delay=0.05), TestBackend(token_delay=0.05)]
    async with inference_nodes(pki, backends) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        doomed = router.generate(chat("w " * 40))
        assert isinstance(await anext(doomed), TokenDelta)
        victim = next(n for n in nodes if n.backend.in_flight)
        survivor_task = asyncio.create_task(drain(router.generate(chat("still standing"))))
        await until(lambda: sum(b.in_flight for b in backends) == 2)
        await victim.kill()
        with pytest.raises(FederationError) as caught:
            async for _ in doomed:
                pass
        assert caught.value.code is ErrorCode.UNAVAILABLE
        text, finished = await survivor_task
        assert (text, finished.finish_reason) == ("still standing", "stop")
        # Later requests avoid the dead node.
        text, _ = await drain(router.generate(chat("after")))
        assert text == "after"


async def test_no_healthy_node_is_unavailable(pki: TestPKI, router_factory: object) -> None:
    async with inference_nodes(pki, [TestBackend()]) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        await nodes[0].kill()
        await router.refresh()
        with pytest.raises(FederationError) as caught:
            await drain(router.generate(chat("hi")))
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert f"no healthy inference node serves model {MODEL}" in caught.value.message


async def test_router_cancels_the_node_call(pki: TestPKI, router_factory: object) -> None:
    backend = TestBackend(token_delay=0.05)
    async with inference_nodes(pki, [backend]) as nodes:
        router = await router_factory(nodes)  # type: ignore[operator]
        events = router.generate(chat("z " * 50))
        await anext(events)
        await events.aclose()
        await until(lambda: backend.in_flight == 0)
        assert backend.cancelled == 1
        assert router.nodes[0].local_in_flight == 0


# ---- tools, embeddings and raw prompts over gRPC ------------------------------------------------

WEATHER_SCHEMA = '{"type": "object", "properties": {"location": {"type": "string"}}, ' \
                 '"required": ["location"]}'


async def test_tool_calls_travel_as_typed_messages(pki: TestPKI) -> None:
    backend = TestBackend()
    async with inference_nodes(pki, [backend]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        history = [
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="weather?"),
            inference_pb2.ChatMessage(
                role=inference_pb2.CHAT_ROLE_ASSISTANT, tool_calls=[inference_pb2.ToolCall(
                    id="call_1", name="get_weather", arguments='{"location": "Oslo"}')]),
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_TOOL, tool_call_id="call_1",
                                      content="cold"),
            inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER,
                                      content='get_weather {"location": "Paris"}')]
        request = inference_pb2.GenerateRequest(
            model=MODEL, messages=history,
            tools=[inference_pb2.Tool(name="get_weather", parameters_json_schema=WEATHER_SCHEMA)],
            tool_choice=inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_REQUIRED))
        responses = [r async for r in stub.Generate(request)]
        pieces = [c for r in responses[:-1] for c in r.delta.tool_calls]
        # Joined by the node's coalescer (a zero-delay backend), still one call.
        assert (pieces[0].index, pieces[0].name) == (0, "get_weather")
        assert pieces[0].id.startswith("call_")
        assert "".join(p.arguments for p in pieces) == '{"location": "Paris"}'
        assert responses[-1].finished.finish_reason == inference_pb2.FINISH_REASON_TOOL_CALLS
        received = backend.requests[-1]
        assert received.messages[1].tool_calls[0].arguments == '{"location": "Oslo"}'
        assert received.messages[2].tool_call_id == "call_1"
        assert received.tools[0].parameters == WEATHER_SCHEMA


async def test_embed_streams_one_vector_per_input(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend()]) as (node,):
        stub = inference_pb2_grpc.InferenceServiceStub(pki.channel(node.address, "gateway"))
        request = inference_pb2.EmbedRequest(model=MODEL, dimensions=5, inputs=[
            inference_pb2.EmbedInput(text="hello world"),
            inference_pb2.EmbedInput(token_ids=inference_pb2.TokenIds(ids=[1, 2, 3]))])
        responses = [r async for r in stub.Embed(request)]
        vectors = [r.embedding for r in responses[:-1]]
        assert [(v.index, len(v.values), v.tokens) for v in vectors] == [(0, 5, 3), (1, 5, 3)]
        usage = responses[-1].finished.usage
        assert (usage.prompt_tokens, usage.total_tokens) == (6, 6)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await anext(aiter(stub.Embed(inference_pb2.EmbedRequest(model=MODEL))))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_router_embeds_on_a_node_serving_the_model(
        pki: TestPKI, router_factory: Any) -> None:
    from federation.inference.types import Embedding, EmbeddingRequest, EmbeddingsFinished

    async with inference_nodes(pki, [TestBackend(), TestBackend()]) as nodes:
        router = await router_factory(nodes)
        events = [e async for e in router.embed(EmbeddingRequest(MODEL, ("a", "b c")))]
        assert [type(e) for e in events] == [Embedding, Embedding, EmbeddingsFinished]
        with pytest.raises(FederationError) as caught:
            [e async for e in router.embed(EmbeddingRequest("nope", ("a",)))]
        assert caught.value.code is ErrorCode.NOT_FOUND


async def test_deltas_that_arrive_with_the_end_are_sent_before_it() -> None:
    """The node's coalescer: while one batch is being sent, the backend produces another
    delta and finishes; that delta must still go out, before the finish."""
    from nodes.inference import _Coalescer

    sending = asyncio.Event()

    async def generation() -> AsyncIterator[GenerationEvent]:
        yield TokenDelta("one")
        await sending.wait()  # the first batch is being sent
        yield TokenDelta(" two")
        yield GenerationFinished("stop", 1, 2, MODEL)

    received: list[GenerationEvent] = []
    async with _Coalescer(generation()) as batches:  # type: ignore[arg-type]
        async for batch in batches:
            received.append(batch)
            sending.set()
            for _ in range(5):  # a slow send: the reader runs to the end meanwhile
                await asyncio.sleep(0)
    text = "".join(e.text for e in received if isinstance(e, TokenDelta))
    assert text == "one two"
    assert isinstance(received[-1], GenerationFinished)


class StallingBackend(TestBackend):
    """A node that can be made too slow to answer its load probe in time (as a node busy
    serving can be): ``GetLoad`` blocks for ``stall`` seconds."""

    stall = 0.0

    def load(self) -> LoadSnapshot:
        time.sleep(self.stall)  # blocks the node's loop, as a busy node would
        return super().load()


async def test_a_node_slow_to_answer_probes_stays_until_the_threshold(
        pki: TestPKI, router_factory: object) -> None:
    backend = StallingBackend()
    async with inference_nodes(pki, [backend]) as nodes:
        router = await router_factory(  # type: ignore[operator]
            nodes, probe_timeout_seconds=0.2, probe_timeouts_to_down=2)
        (node,) = router.nodes
        assert node.healthy
        backend.stall = 0.5
        await router.refresh()
        assert node.healthy and node.probe_timeouts == 1  # one miss: still routed to
        text, _ = await drain(router.generate(chat("served")))
        assert text == "served"
        await router.refresh()
        assert not node.healthy  # the second miss in a row takes it out
        backend.stall = 0.0
        await router.refresh()
        assert node.healthy and node.probe_timeouts == 0

