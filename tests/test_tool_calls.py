"""Tool calls from text-generating models: the streaming parser, the grammar's schema
checks and integer ranges, and the real embedded model (SmolLM2 on llama.cpp) calling
functions under the grammar: on every schema of a varied set, in every run, the
arguments are valid JSON and valid against the function's schema."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import pytest

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.grammar import check_enforceable, integer_range, tool_calls_grammar
from federation.inference.tools import (
    ToolCallParser,
    check_tools,
    prompt_messages,
    written_calls,
)
from federation.inference.types import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)
from tests.test_inference_backends import collect_calls

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None

CALLS = ('<tool_call>[{"name": "get_weather", "arguments": {"location": "Paris \\"x\\"", '
         '"n": [1, {"a": 2}]}}, {"arguments": {"q": 1}, "name": "b\\u00e9"}]</tool_call>')


def parse(text: str, size: int, *, forced: bool = False) -> tuple[str, list[dict[str, str]]]:
    parser = ToolCallParser(forced=forced)
    content, calls = "", {}
    for i in range(0, len(text), size):
        out = parser.feed(text[i:i + size])
        content += out.content
        for piece in out.tool_calls:
            if piece.index not in calls:
                assert piece.id and piece.name
                calls[piece.index] = {"name": piece.name, "arguments": ""}
            else:
                assert not piece.id and not piece.name
            calls[piece.index]["arguments"] += piece.arguments
    content += parser.finish().content
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 1000])
def test_the_parser_reads_calls_however_the_text_is_split(size: int) -> None:
    content, calls = parse(CALLS, size)
    assert content == ""
    assert calls == [
        {"name": "get_weather",
         "arguments": '{"location": "Paris \\"x\\"", "n": [1, {"a": 2}]}'},
        {"name": "bé", "arguments": '{"q": 1}'}]


@pytest.mark.parametrize("text", ["Hello there", "<tool> is not a call", "<", "<tool_c",
                                  "  <tool_call>[] later"])
def test_text_that_is_not_a_call_is_content(text: str) -> None:
    assert parse(text, 1) == (text, [])


def test_unfinished_calls_are_an_error_unless_the_generation_was_cut() -> None:
    parser = ToolCallParser(forced=True)
    parser.feed('<tool_call>[{"name": "f", "arguments": {"a": ')
    with pytest.raises(FederationError):
        ToolCallParser(forced=True).finish()
    assert parser.finish(cut=True).tool_calls == []


def test_history_calls_are_written_in_the_call_format() -> None:
    message = ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "f", '{"a": 1}'),))
    assert parse(written_calls(message), 5)[1] == [{"name": "f", "arguments": '{"a": 1}'}]


# ---- request checks ---------------------------------------------------------------------------

@pytest.mark.parametrize(("tools", "choice", "param"), [
    ((Tool("bad name"),), ToolChoice(), "tools[0].function.name"),
    ((Tool("f"), Tool("f")), ToolChoice(), "tools[1].function.name"),
    ((Tool("f", parameters="[1]"),), ToolChoice(), "tools[0].function.parameters"),
    ((Tool("f"),), ToolChoice("function", "g"), "tool_choice"),
    ((), ToolChoice("required"), "tool_choice"),
])
def test_bad_tools_are_refused_naming_the_parameter(
        tools: tuple[Tool, ...], choice: ToolChoice, param: str) -> None:
    request = GenerationRequest("m", (ChatMessage("user", "hi"),), tools=tools,
                                tool_choice=choice)
    with pytest.raises(FederationError) as caught:
        check_tools(request)
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_ARGUMENT, param)


@pytest.mark.parametrize("schema", [
    {"type": "number", "minimum": 0},
    {"type": "array", "uniqueItems": True},
    {"type": "string", "pattern": "abc"},
    {"type": "string", "pattern": "^a.c$"},
    {"type": "object", "required": ["a"]},
    {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
    {"$ref": "https://example.com/schema.json"},
])
def test_keywords_the_grammar_cannot_enforce_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(FederationError) as caught:
        check_enforceable(schema, "tools[0].function.parameters")
    assert caught.value.param == "tools[0].function.parameters"


@pytest.mark.parametrize(("low", "high"), [(0, 0), (1, 12), (-5, 5), (7, 1234), (-1000, -3),
                                           (None, 10), (3, None), (-17, 260), (99, 100)])
def test_integer_ranges_match_exactly_the_integers_in_range(low: int | None,
                                                            high: int | None) -> None:
    matcher = re.compile("^" + integer_range(low, high).replace('"', "").replace(" ", "") + "$")
    start = (low if low is not None else -3000) - 50
    end = (high if high is not None else 3000) + 50
    for value in range(start, end + 1):
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert bool(matcher.match(str(value))) == inside, value
    assert not matcher.match("05") and not matcher.match("-0")


# ---- the embedded model under the grammar ------------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "additionalProperties": False, "required": ["location"],
                    "properties": {"location": {"type": "string"}}},
    "add_product": {"type": "object", "required": ["name", "price", "inStock"], "properties": {
        "name": {"type": "string"}, "price": {"type": "number"},
        "inStock": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}}}},
    "monthly_expense": {"type": "object", "required": ["month", "year"], "properties": {
        "month": {"type": "integer", "minimum": 1, "maximum": 12},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}},
    "create_event": {"type": "object", "required": ["name", "date", "time", "participants"],
                     "properties": {
                         "name": {"type": "string", "minLength": 1, "maxLength": 40},
                         "date": {"type": "string", "format": "date"},
                         "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                         "participants": {"type": "array", "minItems": 1, "maxItems": 4,
                                          "items": {"type": "string"}}}},
    "set_mode": {"type": "object", "required": ["mode", "level"], "properties": {
        "mode": {"enum": ["off", "eco", "turbo"]},
        "level": {"type": ["integer", "null"]},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
    "math_steps": {"type": "object", "required": ["steps"], "$defs": {"Step": {
        "type": "object", "required": ["explanation", "output"], "properties": {
            "explanation": {"type": "string", "maxLength": 60},
            "output": {"type": "string", "maxLength": 20}}}},
        "properties": {"steps": {"type": "array", "maxItems": 2,
                                 "items": {"$ref": "#/$defs/Step"}}}},
    "nested": {"type": "object", "required": ["user"], "properties": {"user": {
        "type": "object", "required": ["id", "address"], "additionalProperties": False,
        "properties": {"id": {"type": "integer", "exclusiveMinimum": 0},
                       "address": {"type": "object", "required": ["city"],
                                   "properties": {"city": {"type": "string"},
                                                  "zip": {"type": "string",
                                                          "pattern": "^[0-9]{5}$"}}}}}}},
    "no_arguments": {"type": "object", "properties": {}},
}
PROMPTS = ["Please use the tool for: Paris, 3 days, Widget at 19.99, January 2025.",
           "Call the function with sensible values for the weekly team meeting."]


@pytest.fixture(scope="module")
async def smollm2() -> AsyncIterator[Any]:
    from federation.inference.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(ModelConfig(id="smollm2", context_length=2048, n_threads=2,
                                          embeddings=False))
    await backend.start()
    yield backend
    await backend.stop()


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama_cpp (the optional 'llm' extra) not installed")
@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_the_embedded_model_calls_with_arguments_valid_against_the_schema(
        smollm2: Any, name: str) -> None:
    schema = SCHEMAS[name]
    tools = (Tool(name, f"The {name.replace('_', ' ')} function", json.dumps(schema)),
             Tool("other_tool", "Does something else", ""))
    for prompt in PROMPTS:
        # Greedy, and sampled hot: a small model strays most at a high temperature.
        for temperature, seed, choice in ((0.0, 0, ToolChoice("function", name)),
                                          (1.3, 11, ToolChoice("required"))):
            request = GenerationRequest(
                "smollm2", (ChatMessage("user", prompt),),
                SamplingParams(max_tokens=400, temperature=temperature, seed=seed),
                tools=tools, tool_choice=choice, parallel_tool_calls=False)
            calls, finished = await collect_calls(smollm2.generate(request))
            assert finished.finish_reason in ("stop", "tool_calls"), (name, finished)
            assert len(calls) == 1
            called = SCHEMAS.get(calls[0]["name"], {"type": "object", "properties": {}})
            arguments = json.loads(calls[0]["arguments"])
            assert jsonschema_rs.is_valid(called, arguments), (name, arguments)


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama_cpp (the optional 'llm' extra) not installed")
def test_every_schema_of_the_set_compiles_to_a_grammar() -> None:
    tools = [Tool(n, "", json.dumps(s)) for n, s in SCHEMAS.items()]
    grammar = tool_calls_grammar(tools)
    assert grammar.startswith('root ::= "<tool_call>"')


def test_the_prompt_shows_tools_and_results_in_the_trained_layout() -> None:
    request = GenerationRequest(
        "m", (ChatMessage("system", "Be brief."), ChatMessage("user", "weather?"),
              ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "f", "{}"),)),
              ChatMessage("tool", "sunny", tool_call_id="c1")),
        tools=(Tool("f", "Weather"),))
    messages = prompt_messages(request)
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '<tools>[{"name": "f"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>[{"name": "f", "arguments": {}}]</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    none = prompt_messages(GenerationRequest("m", request.messages, tools=request.tools,
                                             tool_choice=ToolChoice("none")))
    assert "<tools>" not in none[0]["content"]  # tool_choice none: the tools are not offered
