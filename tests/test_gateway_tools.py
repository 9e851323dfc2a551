"""Tool calling, logprobs and ``n`` on ``/v1/chat/completions``, driven by the official
``openai`` SDK against the real gateway: the deterministic test backend (whose calls go
through the same streaming parser as llama.cpp's) and an ``openai`` backend in front of a
deterministic OpenAI-wire upstream, which the gateway must pass through faithfully."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.db_support import scratch_database
from tests.keys_support import KeyNodes, key_nodes
from tests.openai_env_support import MODEL, UPSTREAM_MODEL, OpenAIEnv, openai_env
from tests.support import TestPKI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "required": ["location"],
                   "properties": {"location": {"type": "string"}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
async def federation(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KeyNodes]:
    pki = TestPKI(tmp_path_factory.mktemp("gateway-tools") / "home")
    async with scratch_database(pg_admin_url) as database, key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def env(federation: KeyNodes) -> AsyncIterator[OpenAIEnv]:
    async with openai_env(federation) as running:
        yield running


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
async def test_a_tool_call_is_answered_with_typed_calls(env: OpenAIEnv, model: str) -> None:
    async with env.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=user('get_weather {"location": "Paris"}'),
            tools=[WEATHER, TIME])
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"location": "Paris"})
    await env.settle()
    record = await env.record(raw.headers["x-request-id"])
    attributes = dict(record.payload.attributes)
    assert (attributes["status"], attributes["finish_reason"]) == ("200", "tool_calls")
    assert int(attributes["completion_tokens"]) > 0


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
async def test_a_streamed_call_arrives_as_openai_streams_it(env: OpenAIEnv, model: str) -> None:
    # Paced, as a model generates: the node would join pieces that arrive together.
    env.backend.token_delay = env.upstream.token_delay = 0.01
    async with env.client() as client:
        stream = await client.chat.completions.create(
            model=model, messages=user('get_weather {"location": "San Francisco, CA"}'),
            tools=[WEATHER], tool_choice="required", stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks
              if c.choices and c.choices[0].delta.tool_calls]
    first, rest = pieces[0], pieces[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id and first.id.startswith("call_")
    assert rest and all(p.id is None and p.function.name is None for p in rest)
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"location": "San Francisco, CA"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # A forced call opens with content null, as OpenAI's: the SDK's helper then rebuilds
    # a message whose content is None, not "".
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content is None


async def test_the_sdks_stream_helper_reassembles_the_calls(env: OpenAIEnv) -> None:
    async with env.client() as client, client.chat.completions.stream(
        model=MODEL, messages=user('get_time get_weather {"city": "Oslo"}'),
        tools=[WEATHER, TIME],
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    assert json.loads(calls[1].function.arguments) == {"city": "x"}  # the schema's instance
    assert len({c.id for c in calls}) == 2


async def test_parallel_tool_calls_false_makes_one_call(env: OpenAIEnv) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=user("get_time get_weather"), tools=[WEATHER, TIME],
            parallel_tool_calls=False)
    assert [c.function.name for c in completion.choices[0].message.tool_calls or []] == [
        "get_weather"]


async def test_a_named_function_is_called_and_finishes_with_stop(env: OpenAIEnv) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=user("what time is it in Rome?"), tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = completion.choices[0]
    assert [c.function.name for c in choice.message.tool_calls or []] == ["get_time"]
    assert choice.finish_reason == "stop"  # as OpenAI does for a function the caller named


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_choice_none_answers_text_without_calls(env: OpenAIEnv, stream: bool
                                                           ) -> None:
    async with env.client() as client:
        if not stream:
            completion = await client.chat.completions.create(
                model=MODEL, messages=user("get_weather now"), tools=[WEATHER],
                tool_choice="none")
            assert completion.choices[0].message.tool_calls is None
            assert completion.choices[0].message.content == "get_weather now"
            return
        chunks = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=user("get_weather now"), tools=[WEATHER],
            tool_choice="none", stream=True)]
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "get_weather now"


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
async def test_a_tool_result_goes_back_to_the_model(env: OpenAIEnv, model: str) -> None:
    messages: list[Any] = user('get_weather {"location": "Oslo"}')
    async with env.client() as client:
        first = await client.chat.completions.create(model=model, messages=messages,
                                                     tools=[WEATHER])
        message = first.choices[0].message
        call = (message.tool_calls or [])[0]
        messages += [message.model_dump(exclude_unset=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "70 degrees and fog"}]
        second = await client.chat.completions.create(model=model, messages=messages,
                                                      tools=[WEATHER])
    assert second.choices[0].message.content == "70 degrees and fog"
    assert second.choices[0].finish_reason == "stop"
    if model == MODEL:
        history = env.backend.requests[-1].messages
    else:  # what the upstream was sent
        sent = env.upstream.bodies[-1]
        assert sent["tools"] == [WEATHER] and sent["model"] == "real-name"
        assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
        assert sent["messages"][2] == {"role": "tool", "content": "70 degrees and fog",
                                       "tool_call_id": call.id}
        return
    assert history[1].tool_calls[0].id == call.id
    assert json.loads(history[1].tool_calls[0].arguments) == {"location": "Oslo"}
    assert (history[2].role, history[2].tool_call_id) == ("tool", call.id)


async def test_options_reach_the_upstream_as_given(env: OpenAIEnv) -> None:
    async with env.client() as client:
        await client.chat.completions.create(
            model=UPSTREAM_MODEL, messages=user("get_weather"), tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False, logprobs=True, top_logprobs=3)
    sent = env.upstream.bodies[-1]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (sent["parallel_tool_calls"], sent["logprobs"], sent["top_logprobs"]) == (
        False, True, 3)


# ---- logprobs and n --------------------------------------------------------------------------

@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
async def test_logprobs_come_in_openais_shape(env: OpenAIEnv, model: str) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=model, messages=user("alpha beta gamma"), logprobs=True, top_logprobs=2)
        chunks = [c async for c in await client.chat.completions.create(
            model=model, messages=user("alpha beta gamma"), logprobs=True, top_logprobs=2,
            stream=True)]
    content = (completion.choices[0].logprobs or openai.types.chat.ChoiceLogprobs()).content
    assert [lp.token for lp in content or []] == ["alpha", " beta", " gamma"]
    assert [lp.logprob for lp in content or []] == [-0.1, -0.2, -0.3]
    assert all(len(lp.top_logprobs) == 2 and lp.bytes == list(lp.token.encode())
               for lp in content or [])
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content or []]
    assert [lp.token for lp in streamed] == ["alpha", " beta", " gamma"]


async def test_without_logprobs_there_are_none(env: OpenAIEnv) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(model=MODEL, messages=user("a b"))
    assert completion.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_are_generated_and_charged(env: OpenAIEnv, stream: bool) -> None:
    async with env.client() as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model=MODEL, messages=user("one two"), n=3, stream=True,
                stream_options={"include_usage": True})]
            texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks
                                if c.choices and c.choices[0].index == i) for i in range(3)}
            assert texts == {0: "one two", 1: "one two", 2: "one two"}
            usage = chunks[-1].usage
        else:
            completion = await client.chat.completions.create(model=MODEL,
                                                              messages=user("one two"), n=3)
            assert [c.index for c in completion.choices] == [0, 1, 2]
            assert {c.message.content for c in completion.choices} == {"one two"}
            usage = completion.usage
    assert usage is not None
    # Three generations; the prompt counts once, as in OpenAI's usage.
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 6)
    await env.settle()
    assert await env.tokens_used() == 9
