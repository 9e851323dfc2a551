"""SmolLM2 through the whole stack: openai SDK → gateway → mTLS gRPC → inference node →
llama.cpp, with the real key authority and thermal memory nodes (real PostgreSQL) behind
the gateway: chat, structured output, a tool call under the grammar, embeddings and a text
completion with logprobs, through the openai SDK (a few seconds on 2 cores)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path

import jsonschema_rs
import openai
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from federation.config import InferenceConfig, ModelConfig
from federation.db import Database
from federation.inference.llamacpp import LlamaCppBackend, json_schema_grammar
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    TokenDelta,
)
from gateway_http.app import GatewayServer
from nodes import inference
from nodes.runtime import NodeRuntime
from tests.gateway_support import gateway_settings
from tests.keys_support import key_nodes
from tests.support import TestPKI, serving

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama_cpp (the optional 'llm' extra) not installed")

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["location"],
                   "properties": {"location": {"type": "string"},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


async def test_smollm2_end_to_end(tmp_path: Path, database: Database) -> None:
    pki = TestPKI(tmp_path / "home")
    model = ModelConfig(id=MODEL, backend="llamacpp", context_length=1024, n_threads=2)
    node_settings = dataclasses.replace(gateway_settings(pki.home, []),
                                        inference=InferenceConfig(models=(model,)))
    async with contextlib.AsyncExitStack() as cleanup:
        runtime = NodeRuntime(node_settings, "inference", pki.identity("inference", "server"),
                              None, CollectorRegistry(), cleanup)
        registration = await inference.create_service(runtime)
        async with (
            serving(pki, [registration], role="inference") as node,
            key_nodes(pki, database) as federation,
        ):
            key = (await federation.issue("tenant", ["chat", "embeddings"])).secret
            gateway = GatewayServer(
                federation.wire(gateway_settings(pki.home, [f"127.0.0.1:{node.port}"])),
                pki.identity("gateway"))
            await gateway.start()
            try:
                async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1",
                                              api_key=key, max_retries=0) as client:
                    assert [m.id for m in (await client.models.list()).data] == [MODEL]
                    completion = await client.chat.completions.create(
                        model=MODEL, temperature=0, seed=1, max_tokens=24,
                        messages=[{"role": "user", "content": "Name the planet we live on."}])
                    stream = await client.chat.completions.create(
                        model=MODEL, temperature=0, max_tokens=40, stream=True,
                        stream_options={"include_usage": True},
                        messages=[{"role": "user", "content": "Give a person as JSON."}],
                        response_format={"type": "json_schema", "json_schema": {
                            "name": "person", "schema": {
                                "type": "object", "required": ["name", "age"],
                                "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}}}})
                    chunks = [c async for c in stream]
                    async with client.chat.completions.stream(
                        model=MODEL, temperature=0, max_tokens=120, tools=[WEATHER],
                        tool_choice="required",
                        messages=[{"role": "user", "content": "Weather in Paris?"}],
                    ) as tool_stream:
                        called = await tool_stream.get_final_completion()
                    vectors = await client.embeddings.create(model=MODEL,
                                                             input=["hello", "world"])
                    text_completion = await client.completions.create(
                        model=MODEL, prompt="The capital of France is", max_tokens=4,
                        temperature=0, logprobs=2, echo=False)
                    with pytest.raises(openai.BadRequestError) as unenforceable:
                        await client.chat.completions.create(
                            model=MODEL, max_tokens=8, messages=[
                                {"role": "user", "content": "A price as JSON."}],
                            response_format={"type": "json_schema", "json_schema": {
                                "name": "price", "strict": True, "schema": {
                                    "type": "object", "required": ["eur"],
                                    "properties": {"eur": {"type": "number",
                                                           "minimum": 0}}}}})
                    with pytest.raises(openai.BadRequestError) as overflow:
                        await client.chat.completions.create(
                            model=MODEL, max_tokens=1,
                            messages=[{"role": "user", "content": "word " * 3000}])
            finally:
                await gateway.stop()
    # strict: a schema the grammar cannot hold to is refused, naming where.
    assert unenforceable.value.param == "response_format.json_schema.schema"
    # A prompt past the context: OpenAI's code, which clients act on by shortening it.
    assert overflow.value.code == "context_length_exceeded"
    assert overflow.value.param == "messages"
    # A tool call under the grammar: arguments valid against the function's schema.
    (call,) = called.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert jsonschema_rs.is_valid(WEATHER["function"]["parameters"],
                                  json.loads(call.function.arguments))
    assert called.choices[0].finish_reason == "tool_calls"
    # Embeddings: one unit vector per input, 576 wide (SmolLM2's hidden size).
    assert [len(v.embedding) for v in vectors.data] == [576, 576]
    assert abs(sum(x * x for x in vectors.data[0].embedding) - 1) < 1e-3
    assert vectors.usage.prompt_tokens >= 2
    # A text completion with the log probability of each of its tokens.
    choice = text_completion.choices[0]
    assert choice.logprobs is not None
    assert len(choice.logprobs.tokens or []) == 4 and choice.finish_reason == "length"
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs or [])
    text = completion.choices[0].message.content or ""
    assert text.strip()
    assert completion.usage is not None and completion.usage.prompt_tokens > 5
    assert 1 <= completion.usage.completion_tokens <= 24
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    person = json.loads(streamed)  # the grammar guarantees the schema's shape
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3


# ---- structured output with a pydantic schema ($defs/$ref, arrays of objects) -----------------

class _Step(BaseModel):
    explanation: str = Field(max_length=32)
    output: str = Field(max_length=16)


class _MathReasoning(BaseModel):
    # Bounded so that even a rambling 135M model finishes within max_tokens.
    steps: list[_Step] = Field(max_length=2)
    final_answer: str = Field(max_length=16)


def test_schema_grammar_resolves_defs_and_keeps_strings_valid_json() -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    grammar = json_schema_grammar(json.dumps(_MathReasoning.model_json_schema()))
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    step = rules["steps-item"].strip()  # the $ref'd definition became a rule of its own
    assert "explanation-kv" in rules[step] and "output-kv" in rules[step]
    # No raw control character inside a JSON string (llama-cpp-python's own rule allows them).
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F] |')
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp accepts it


async def test_smollm2_output_validates_against_a_pydantic_schema_with_defs() -> None:
    backend = LlamaCppBackend(ModelConfig(id=MODEL, backend="llamacpp", context_length=1024,
                                          n_threads=2))
    await backend.start()
    try:
        request = GenerationRequest(
            MODEL,
            (ChatMessage("system", "You are a helpful math tutor. Guide the user through the "
                                   "solution step by step."),
             ChatMessage("user", "how can I solve 8x + 7 = -23")),
            SamplingParams(temperature=0, seed=1, max_tokens=200),
            ResponseFormat("json_schema", json.dumps(_MathReasoning.model_json_schema()),
                           "math_reasoning"),
        )
        events = [event async for event in backend.generate(request)]
    finally:
        await backend.stop()
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    finished = events[-1]
    assert isinstance(finished, GenerationFinished) and finished.finish_reason == "stop"
    _MathReasoning.model_validate_json(text)
