"""One backend contract, run against every backend implementation.

The ``openai`` backend talks to a small aiohttp stand-in for an
OpenAI-compatible server (the real upstream lives outside the federation);
the ``llamacpp`` backend runs the real SmolLM2 model when llama_cpp is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import jsonschema_rs
import pytest

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.backend import Backend, BackendSet
from federation.inference.budget import prompt_token_bound
from federation.inference.openai_upstream import OpenAIUpstreamBackend
from federation.inference.test_backend import TestBackend
from federation.inference.types import (
    ChatMessage,
    Embedding,
    EmbeddingRequest,
    EmbeddingsFinished,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    TextPrompt,
    TokenDelta,
    Tool,
    ToolChoice,
)
from tests.gateway_support import eventually
from tests.openai_upstream import OpenAIUpstream, serving

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def request(model: str, text: str = "alpha beta gamma delta epsilon", **sampling: Any
            ) -> GenerationRequest:
    return GenerationRequest(
        model, (ChatMessage("system", "Be brief."), ChatMessage("user", text)),
        SamplingParams(**sampling),
    )


async def collect(events: AsyncIterator[GenerationEvent]) -> tuple[str, GenerationFinished]:
    text, finished = "", None
    async for event in events:
        assert finished is None, "GenerationFinished must be the last event"
        if isinstance(event, TokenDelta):
            text += event.text
        else:
            finished = event
    assert finished is not None, "a generation must end with GenerationFinished"
    return text, finished


async def collect_calls(events: AsyncIterator[GenerationEvent]
                        ) -> tuple[list[dict[str, str]], GenerationFinished]:
    """The streamed tool calls reassembled as OpenAI's SDK does, checking the stream's
    shape: a call's first piece has its id and name, later pieces only arguments."""
    calls: dict[int, dict[str, str]] = {}
    finished = None
    async for event in events:
        if isinstance(event, GenerationFinished):
            finished = event
            continue
        for piece in event.tool_calls:
            if piece.index not in calls:
                assert piece.id and piece.name, "a call's first piece names it"
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            else:
                assert not piece.id and not piece.name
            calls[piece.index]["arguments"] += piece.arguments
    assert finished is not None
    return [calls[i] for i in sorted(calls)], finished


WEATHER = {"type": "object", "additionalProperties": False, "required": ["location"],
           "properties": {"location": {"type": "string", "description": "City and country"},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}


def tool_request(model: str, text: str, mode: str = "auto", **extra: Any) -> GenerationRequest:
    return GenerationRequest(
        model, (ChatMessage("system", "You are a helpful assistant that can use tools."),
                ChatMessage("user", text)),
        SamplingParams(max_tokens=120, temperature=0.0),
        tools=(Tool("get_weather", "Get the current weather", json.dumps(WEATHER)),
               Tool("get_time", "Get the time in a city", json.dumps(
                   {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]}))),
        tool_choice=ToolChoice(mode, "get_weather" if mode == "function" else ""), **extra)


async def wait_idle(backend: Backend) -> None:
    await eventually(lambda: not backend.load().in_flight)


# ---- a deterministic OpenAI-compatible upstream -----------------------------------------------

@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[tuple[OpenAIUpstream, str]]:
    fake = OpenAIUpstream()
    async with serving(fake) as url:
        yield fake, url


# ---- the contract ------------------------------------------------------------------------------

class BackendContract:
    """Behaviour every backend must show. Subclasses provide ``backend`` and ``model``."""

    long_prompt = "alpha beta gamma delta epsilon zeta eta theta iota kappa"

    async def test_lists_its_model(self, backend: Backend, model: str) -> None:
        assert model in [m.id for m in backend.models()]
        assert backend.load().capacity > 0

    async def test_streams_deltas_then_one_finished(self, backend: Backend, model: str) -> None:
        text, finished = await collect(backend.generate(request(model, max_tokens=8)))
        assert text
        assert finished.prompt_tokens > 0
        assert 1 <= finished.completion_tokens <= 8
        assert finished.finish_reason in ("stop", "length")

    async def test_max_tokens_ends_with_length(self, backend: Backend, model: str) -> None:
        _, finished = await collect(backend.generate(request(model, self.long_prompt,
                                                             max_tokens=3)))
        assert finished.finish_reason == "length"
        assert finished.completion_tokens == 3

    async def test_stop_sequence_is_not_emitted(self, backend: Backend, model: str) -> None:
        text, finished = await collect(backend.generate(
            request(model, self.long_prompt, max_tokens=12, stop=("e",))))
        assert "e" not in text
        assert finished.finish_reason in ("stop", "length")

    async def test_json_object_format(self, backend: Backend, model: str) -> None:
        req = GenerationRequest(
            model, (ChatMessage("user", "Reply with a JSON object with key echo."),),
            SamplingParams(max_tokens=10, temperature=0.0),
            ResponseFormat("json_object"),
        )
        text, _ = await collect(backend.generate(req))
        assert text.strip().startswith("{")

    async def test_closing_early_stops_generation(self, backend: Backend, model: str) -> None:
        events = backend.generate(request(model, self.long_prompt, max_tokens=200))
        first = await anext(events)
        assert isinstance(first, TokenDelta)
        await events.aclose()
        await wait_idle(backend)
        _, finished = await collect(backend.generate(request(model, max_tokens=2)))
        assert finished.completion_tokens <= 2

    async def test_cancelling_the_consumer_stops_generation(self, backend: Backend, model: str
                                                            ) -> None:
        got_first = asyncio.Event()

        async def consume() -> None:
            async for _ in backend.generate(request(model, self.long_prompt, max_tokens=200)):
                got_first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_first.wait(), 10)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await wait_idle(backend)


    # -- tools, logprobs, raw prompts, embeddings ---------------------------------------------

    async def test_a_named_function_is_called_with_valid_arguments(
        self, backend: Backend, model: str
    ) -> None:
        calls, finished = await collect_calls(backend.generate(
            tool_request(model, "What's the weather like in San Francisco?", "function")))
        assert [c["name"] for c in calls] == ["get_weather"]
        assert jsonschema_rs.is_valid(WEATHER, json.loads(calls[0]["arguments"]))
        assert calls[0]["id"].startswith("call")
        assert finished.finish_reason == "stop"  # as OpenAI, for a function the caller named

    async def test_required_calls_a_tool_and_finishes_with_tool_calls(
        self, backend: Backend, model: str
    ) -> None:
        calls, finished = await collect_calls(backend.generate(
            tool_request(model, "What's the weather like in Paris?", "required",
                         parallel_tool_calls=False)))
        assert len(calls) == 1 and calls[0]["name"] in ("get_weather", "get_time")
        assert json.loads(calls[0]["arguments"])
        assert finished.finish_reason == "tool_calls"

    async def test_tool_choice_none_answers_text(self, backend: Backend, model: str) -> None:
        req = tool_request(model, "get_weather in Paris, please", "none")
        text, finished = await collect(backend.generate(replace(
            req, sampling=SamplingParams(max_tokens=8, temperature=0.0))))
        assert text and finished.finish_reason in ("stop", "length")

    async def test_logprobs_come_with_each_token(self, backend: Backend, model: str) -> None:
        logprobs = []
        async for event in backend.generate(replace(request(model, max_tokens=4), logprobs=2)):
            if isinstance(event, TokenDelta):
                logprobs += event.logprobs
            else:
                finished = event
        assert len(logprobs) == finished.completion_tokens
        for lp in logprobs:
            assert lp.logprob is not None and lp.logprob <= 0
            assert len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob
            assert lp.token_bytes

    async def test_a_raw_prompt_is_echoed_first(self, backend: Backend, model: str) -> None:
        req = GenerationRequest(model, (), SamplingParams(max_tokens=3, temperature=0.0),
                                prompt=TextPrompt("The capital of France is", echo=True))
        events = [e async for e in backend.generate(req)]
        first = events[0]
        assert isinstance(first, TokenDelta) and first.echo
        assert first.text == "The capital of France is" and first.tokens == 0
        assert first.prompt_tokens is not None
        assert not any(isinstance(e, TokenDelta) and e.echo for e in events[1:])
        finished = events[-1]
        assert isinstance(finished, GenerationFinished) and finished.completion_tokens >= 1

    async def test_embeds_each_input(self, backend: Backend, model: str) -> None:
        events = [e async for e in backend.embed(EmbeddingRequest(
            model, ("hello world", "the cat sat on the mat")))]
        vectors = [e for e in events if isinstance(e, Embedding)]
        finished = events[-1]
        assert isinstance(finished, EmbeddingsFinished) and finished.prompt_tokens > 0
        assert sorted(v.index for v in vectors) == [0, 1]
        assert len(vectors[0].values) == len(vectors[1].values) > 0
        assert vectors[0].values != vectors[1].values
        for vector in vectors:
            assert abs(sum(v * v for v in vector.values) - 1) < 1e-3  # unit length

    # -- token budgets (the API key's reservation) -------------------------------------------

    delta_token_slack = 0
    """How many tokens more than the completion a stream's deltas may count."""

    async def first_delta(self, backend: Backend, req: GenerationRequest) -> TokenDelta:
        events = backend.generate(req)
        try:
            first = await anext(events)
        finally:
            await events.aclose()
        await wait_idle(backend)
        assert isinstance(first, TokenDelta)
        return first

    async def test_deltas_count_the_prompt_and_their_tokens(
        self, backend: Backend, model: str
    ) -> None:
        req = request(model, self.long_prompt, max_tokens=6)
        deltas: list[TokenDelta] = []
        finished = None
        async for event in backend.generate(req):
            if isinstance(event, TokenDelta):
                deltas.append(event)
            else:
                finished = event
        assert finished is not None
        prompts = [d.prompt_tokens for d in deltas]
        assert prompts[0] is not None and prompts[0] >= finished.prompt_tokens
        assert prompts[1:] == [None] * (len(deltas) - 1)  # the first delta only
        counted = sum(d.tokens for d in deltas)
        assert finished.completion_tokens <= counted
        assert counted <= finished.completion_tokens + self.delta_token_slack

    async def test_a_budget_caps_the_completion(self, backend: Backend, model: str) -> None:
        req = request(model, self.long_prompt, max_tokens=50)
        prompt = (await self.first_delta(backend, req)).prompt_tokens
        assert prompt is not None
        _, finished = await collect(backend.generate(replace(req, token_budget=prompt + 3)))
        assert (finished.finish_reason, finished.completion_tokens) == ("length", 3)
        assert finished.total_tokens <= prompt + 3

    async def test_a_prompt_the_budget_cannot_hold_is_refused(
        self, backend: Backend, model: str
    ) -> None:
        req = request(model, self.long_prompt, max_tokens=50)
        prompt = (await self.first_delta(backend, req)).prompt_tokens
        assert prompt is not None
        for budget in (prompt, 0):
            with pytest.raises(FederationError) as caught:
                await collect(backend.generate(replace(req, token_budget=budget)))
            assert caught.value.code is ErrorCode.INSUFFICIENT_QUOTA
        await wait_idle(backend)
        _, finished = await collect(backend.generate(replace(req, token_budget=prompt + 1)))
        assert finished.completion_tokens == 1  # one token of room is enough


class TestTestBackend(BackendContract):
    @pytest.fixture
    def model(self) -> str:
        return "test-model"

    @pytest.fixture
    def backend(self) -> TestBackend:
        # A small delay so cancellation tests catch it mid-generation.
        return TestBackend(token_delay=0.005)

    async def test_echo_is_deterministic(self, backend: TestBackend, model: str) -> None:
        text, finished = await collect(backend.generate(request(model, "one two three")))
        assert text == "one two three"
        assert (finished.finish_reason, finished.completion_tokens) == ("stop", 3)

    async def test_cancellation_is_counted(self, backend: TestBackend, model: str) -> None:
        events = backend.generate(request(model, self.long_prompt))
        await anext(events)
        await events.aclose()
        assert (backend.cancelled, backend.completed) == (1, 0)


class TestOpenAIUpstreamBackend(BackendContract):
    @pytest.fixture
    def model(self) -> str:
        return "upstream-model"

    @pytest.fixture
    async def backend(self, upstream: tuple[OpenAIUpstream, str]
                      ) -> AsyncIterator[OpenAIUpstreamBackend]:
        fake, url = upstream
        fake.status, fake.token_delay = 200, 0.005
        fake.error = {"message": "slow down"}
        backend = OpenAIUpstreamBackend(ModelConfig(
            id="upstream-model", backend="openai", base_url=url, upstream_model="real-name"))
        await backend.start()
        yield backend
        await backend.stop()

    async def test_passes_parameters_through(self, backend: OpenAIUpstreamBackend, model: str,
                                             upstream: tuple[OpenAIUpstream, str]) -> None:
        req = GenerationRequest(model, (ChatMessage("user", "hi there"),),
                                SamplingParams(temperature=0.5, seed=3, stop=("x",)),
                                ResponseFormat("json_schema", '{"type": "object"}', "thing"))
        await collect(backend.generate(req))
        sent = upstream[0].bodies[-1]
        assert sent["model"] == "real-name"
        assert (sent["temperature"], sent["seed"], sent["stop"]) == (0.5, 3, ["x"])
        assert "top_p" not in sent  # unset fields stay unset
        assert sent["response_format"] == {
            "type": "json_schema", "json_schema": {"name": "thing", "schema": {"type": "object"}}}
        assert sent["stream_options"] == {"include_usage": True}

    async def test_a_budget_caps_max_tokens_by_a_prompt_bound(
        self, backend: OpenAIUpstreamBackend, model: str, upstream: tuple[OpenAIUpstream, str]
    ) -> None:
        req = request(model, "a b c", max_tokens=40)
        bound = prompt_token_bound(req.messages)
        await collect(backend.generate(replace(req, token_budget=bound + 25)))
        assert upstream[0].bodies[-1]["max_tokens"] == 25
        await collect(backend.generate(replace(req, token_budget=bound + 100)))
        assert upstream[0].bodies[-1]["max_tokens"] == 40  # the request's own limit
        unlimited = request(model, "a b c")
        await collect(backend.generate(replace(unlimited, token_budget=bound + 7)))
        assert upstream[0].bodies[-1]["max_tokens"] == 7

    async def test_upstream_usage_is_reported(self, backend: OpenAIUpstreamBackend, model: str
                                              ) -> None:
        _, finished = await collect(backend.generate(request(model, "a b c")))
        assert (finished.prompt_tokens, finished.completion_tokens) == (11, 3)

    async def test_upstream_429_maps_to_resource_exhausted(
        self, backend: OpenAIUpstreamBackend, model: str, upstream: tuple[OpenAIUpstream, str]
    ) -> None:
        upstream[0].status = 429
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(request(model)))
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert caught.value.retry_after_seconds == 7

    async def test_an_upstream_context_overflow_keeps_its_code(
        self, backend: OpenAIUpstreamBackend, model: str, upstream: tuple[OpenAIUpstream, str]
    ) -> None:
        upstream[0].status = 400
        upstream[0].error = {"message": "This model's maximum context length is 4096 tokens.",
                             "type": "invalid_request_error", "param": "messages",
                             "code": "context_length_exceeded"}
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(request(model)))
        assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
        assert caught.value.message.startswith("This model's maximum context length")

    async def test_unreachable_upstream_is_unavailable(self) -> None:
        backend = OpenAIUpstreamBackend(ModelConfig(
            id="m", backend="openai", base_url="http://127.0.0.1:9/v1",
            connect_timeout_seconds=1))
        await backend.start()
        try:
            with pytest.raises(FederationError) as caught:
                await collect(backend.generate(request("m")))
            assert caught.value.code is ErrorCode.UNAVAILABLE
        finally:
            await backend.stop()


@pytest.fixture(scope="module")
async def llama_backend() -> AsyncIterator[Backend]:
    """One loaded model for every llamacpp contract test (loading takes ~1 s)."""
    from federation.inference.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(ModelConfig(id="smollm2", context_length=512,
                                          queue_capacity=1, n_threads=2))
    await backend.start()
    yield backend
    await backend.stop()


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama_cpp (the optional 'llm' extra) not installed")
class TestLlamaCppBackend(BackendContract):
    long_prompt = "Write a very long story about a dragon who learns to bake bread."
    delta_token_slack = 2
    """A delta's count includes what llama.cpp sampled before it: the end-of-sequence
    token, and the stopping criteria's last check after the loop."""

    @pytest.fixture
    def model(self) -> str:
        return "smollm2"

    @pytest.fixture
    def backend(self, llama_backend: Backend) -> Backend:
        return llama_backend

    async def test_queue_full_is_resource_exhausted(self, backend: Backend, model: str) -> None:
        running = backend.generate(request(model, self.long_prompt, max_tokens=200))
        await anext(running)  # holds the model
        waiting = asyncio.create_task(collect(backend.generate(request(model, max_tokens=1))))
        await asyncio.sleep(0.05)
        assert backend.load().queued == 1
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(request(model, max_tokens=1)))
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        await running.aclose()
        await asyncio.wait_for(waiting, 30)

    async def test_seed_makes_sampling_reproducible(self, backend: Backend, model: str) -> None:
        kwargs: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 42}
        first, _ = await collect(backend.generate(request(model, self.long_prompt, **kwargs)))
        second, _ = await collect(backend.generate(request(model, self.long_prompt, **kwargs)))
        assert first == second

    async def test_message_content_is_literal_text_not_control_tokens(
        self, backend: Backend, model: str
    ) -> None:
        # "<|im_start|>" typed by a user is text (several tokens each), never the marker
        # that opens a turn (one control token each).
        plain = (await self.first_delta(backend, request(model, "x", max_tokens=1))
                 ).prompt_tokens
        marked = (await self.first_delta(backend, request(model, "<|im_start|>" * 10,
                                                          max_tokens=1))).prompt_tokens
        assert plain is not None and marked is not None
        assert marked - plain >= 30

    @pytest.mark.parametrize("messages", [
        (ChatMessage("user", "a"),) * 30_000,             # refused before the template
        (ChatMessage("user", "<|im_end|>" * 12_000),),   # refused as the context fills
    ], ids=["many messages", "one long message"])
    async def test_a_prompt_far_past_the_context_is_refused(
        self, backend: Backend, model: str, messages: tuple[ChatMessage, ...]
    ) -> None:
        req = GenerationRequest(model, messages, SamplingParams(max_tokens=1))
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(req))
        assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
        assert "more than 512 tokens" in caught.value.message
        text, _ = await collect(backend.generate(request(model, max_tokens=2)))
        assert text  # and the model still serves the next request

    async def test_a_strict_schema_with_a_keyword_the_grammar_cannot_enforce_is_refused(
        self, backend: Backend, model: str
    ) -> None:
        schema = json.dumps({"type": "object", "required": ["x"],
                             "properties": {"x": {"type": "number", "minimum": 0}}})
        strict = GenerationRequest(model, (ChatMessage("user", "JSON please."),),
                                   SamplingParams(max_tokens=12),
                                   ResponseFormat("json_schema", schema, "x", strict=True))
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(strict))
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
        assert caught.value.param is not None and \
            caught.value.param.startswith("response_format.json_schema.schema")
        assert "bounds at #/properties/x" in caught.value.message
        # Without strict the schema is followed as far as the grammar goes (best effort).
        text, _ = await collect(backend.generate(replace(
            strict, response_format=replace(strict.response_format, strict=False))))
        assert text.startswith("{")

    async def test_a_schema_llama_cpp_rejects_is_refused_not_a_crash(
        self, backend: Backend, model: str
    ) -> None:
        # The converter emits a grammar for this property name that llama.cpp's parser
        # rejects; sampling with it used to kill the process with SIGSEGV.
        schema = json.dumps({"type": "object", "properties": {'a b"c': {"type": "string"}}})
        req = GenerationRequest(model, (ChatMessage("user", "JSON please."),),
                                SamplingParams(max_tokens=10),
                                ResponseFormat("json_schema", schema, "odd"))
        with pytest.raises(FederationError) as caught:
            await collect(backend.generate(req))
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
        assert caught.value.param == "response_format"
        text, _ = await collect(backend.generate(request(model, max_tokens=2)))
        assert text  # and the model still serves the next request


async def test_backend_set_routes_by_model_and_refuses_unknown() -> None:
    backends = BackendSet([TestBackend(("a",)), TestBackend(("b",))])
    assert [m.id for m in backends.models()] == ["a", "b"]
    _, finished = await collect(backends.generate(request("b", "x y")))
    assert finished.model == "b"
    with pytest.raises(FederationError) as caught:
        backends.generate(request("nope"))
    assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(FederationError) as caught:
        backends.generate(GenerationRequest("a", ()))
    assert caught.value.param == "messages"
