"""A deterministic backend, for tests and the gateway benchmark (zero delays: only the
path around the backend is measured). Delays and failures can be injected, and counters
let tests observe that cancellation really reached the backend.

What it answers, derived from the request alone:

* a chat: the last user message, word by word (``{"echo": ...}`` under a JSON format);
* with tools (unless ``tool_choice`` is ``none``): the named function; else every tool
  whose name appears in the last user message (the first one only without
  ``parallel_tool_calls``); none named: ``auto`` answers text, ``required`` calls the
  first tool. The arguments are the first JSON object written in the last user message,
  else an instance of the function's schema (:func:`schema_instance`). A conversation
  that ends with a tool's result is answered with that result's words. Calls are
  written in the text format of ``federation.inference.tools`` and streamed through its
  parser in pieces of :data:`CALL_PIECE` characters, as llama.cpp's are;
* a raw prompt: its words (token ids read as ``t<id>``), or with a suffix the suffix's
  words; ``echo`` repeats the prompt first;
* logprobs: token *i* has log probability ``-(i + 1) / 10``; its alternatives are the
  token itself and ``<token>~<j>``, each one less likely;
* embeddings: unit vectors from SHA-256 of the input, :data:`DIMENSIONS` long or the
  requested ``dimensions``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Final

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit
from federation.inference.tools import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolCallParser,
    parameters_schema,
)
from federation.inference.types import (
    Embedding,
    EmbeddingRequest,
    EmbeddingsFinished,
    EmbedEvent,
    FinishReason,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    TokenDelta,
    TokenLogprob,
    Tool,
    TopLogprob,
)
from federation.logs import request_id_var

DIMENSIONS: Final = 16
CALL_PIECE: Final = 8


def echo_tokens(request: GenerationRequest) -> list[str]:
    """The text deltas the test backend produces before max_tokens/stop apply."""
    if request.prompt is not None:
        source = request.prompt.suffix or _prompt_text(request)
    elif request.messages and request.messages[-1].role == "tool":
        source = request.messages[-1].content
    else:
        source = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    words = source.split() or ["(empty)"]
    tokens = [words[0], *(" " + w for w in words[1:])]
    if request.response_format.type != "text":
        text = json.dumps({"echo": "".join(tokens)})
        # Keep several deltas so JSON output also streams.
        cut = len(text) // 2
        return [text[:cut], text[cut:]]
    return tokens


def _prompt_text(request: GenerationRequest) -> str:
    assert request.prompt is not None
    if request.prompt.text is not None:
        return request.prompt.text
    return " ".join(f"t{t}" for t in request.prompt.token_ids)


def prompt_token_count(request: GenerationRequest) -> int:
    """The prompt's tokens as this backend counts them: each message's words, plus one
    (a raw prompt: its words, or its token ids)."""
    if request.prompt is not None:
        if request.prompt.text is None:
            return len(request.prompt.token_ids)
        return len(request.prompt.text.split()) + 1
    return sum(len(m.content.split()) + 1 for m in request.messages)


# ---- tool calls --------------------------------------------------------------------------

def chosen_tools(request: GenerationRequest) -> list[Tool]:
    """The tools the test backend calls (see the module docstring); [] answers text."""
    if not request.calls_tools:
        return []
    choice = request.tool_choice
    if choice.mode == "function":
        return [t for t in request.tools if t.name == choice.function]
    if request.messages and request.messages[-1].role == "tool" and choice.mode == "auto":
        return []
    said = _last_user(request)
    named = [t for t in request.tools if t.name in said.replace("(", " ").split()]
    if not named and choice.mode == "required":
        named = [request.tools[0]]
    return named if request.parallel_tool_calls else named[:1]


def _last_user(request: GenerationRequest) -> str:
    return next((m.content for m in reversed(request.messages) if m.role == "user"), "")


def call_text(request: GenerationRequest, tools: Sequence[Tool]) -> str:
    """The calls, in the text format a model writes them."""
    given = _json_object_in(_last_user(request))
    calls = [{"name": t.name,
              "arguments": given if given is not None and i == 0
              else schema_instance(parameters_schema(t))}
             for i, t in enumerate(tools)]
    return TOOL_OPEN + json.dumps(calls) + TOOL_CLOSE


def _json_object_in(text: str) -> dict[str, Any] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def schema_instance(schema: Any, root: Any = None) -> Any:
    """A small, deterministic instance of a JSON Schema (the keywords tool schemas use)."""
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_instance(target, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return schema_instance(schema[key][0], root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: schema_instance(properties.get(name, {}), root)
                for name in schema.get("required") or ()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), root)
                for _ in range(schema.get("minItems", 1))]
    return _scalar(kind, schema)


def _scalar(kind: Any, schema: dict[str, Any]) -> Any:
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        return max(math.ceil(low), min(1, int(schema.get("maximum", 1))))
    if kind == "number":
        return float(schema.get("minimum", 0.5))
    if kind == "boolean":
        return True
    if kind == "string":
        return "x" * max(1, schema.get("minLength", 1))
    return None


# ---- log probabilities and embeddings ----------------------------------------------------

def token_logprob(token: str, position: int, top: int) -> TokenLogprob:
    value = -(position + 1) / 10
    alternatives = [TopLogprob(token, value, token.encode())] + [
        TopLogprob(f"{token}~{j}", value - j, f"{token}~{j}".encode()) for j in range(1, top)]
    return TokenLogprob(token, value, token.encode(), tuple(alternatives[:top]))


def embedding_vector(item: str | tuple[int, ...], dimensions: int) -> tuple[float, ...]:
    seed = (item if isinstance(item, str) else ",".join(map(str, item))).encode()
    raw = b""
    counter = 0
    while len(raw) < dimensions:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    values = [b / 255 - 0.5 for b in raw[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


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
        self.embed_requests: list[EmbeddingRequest] = []

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

    def _admit(self, model: str) -> None:
        if model not in {i.id for i in self._infos}:
            raise FederationError(ErrorCode.NOT_FOUND, f"model {model!r} is not served")
        if self.in_flight >= self.capacity:
            raise FederationError(ErrorCode.RESOURCE_EXHAUSTED, "test backend is full")
        if self.fail_before_first is not None:
            raise self.fail_before_first

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        self._admit(request.model)
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
            if request.prompt is not None and request.prompt.echo:
                yield TokenDelta(_prompt_text(request), 0, prompt, echo=True)
                prompt_sent = True
            else:
                prompt_sent = False
            count = 0
            tools = chosen_tools(request)
            pieces = _call_pieces(request, tools) if tools else \
                _apply_limits(echo_tokens(request), request, limit)
            parser = ToolCallParser(forced=True) if tools else None
            for text in pieces[:limit]:
                if self.fail_after_tokens is not None and count >= self.fail_after_tokens:
                    raise FederationError(ErrorCode.INTERNAL, "injected failure")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if self.stall_after_tokens is not None and count >= self.stall_after_tokens:
                    await asyncio.Event().wait()  # wedged: only a cancellation ends it
                first_prompt = prompt if count == 0 and not prompt_sent else None
                count += 1
                yield self._delta(request, text, parser, count, first_prompt)
            available = len(pieces) if tools else len(echo_tokens(request))
            reason = self._reason(request, tools, limit, count, available)
            if parser is not None:
                parser.finish(cut=reason == "length")
            finished = True
            yield GenerationFinished(reason, prompt, count, request.model)
        finally:
            self.in_flight -= 1
            if finished:
                self.completed += 1
            else:
                self.cancelled += 1

    @staticmethod
    def _delta(request: GenerationRequest, text: str, parser: ToolCallParser | None,
               count: int, prompt: int | None) -> TokenDelta:
        logprobs = () if request.logprobs is None else (
            token_logprob(text, count - 1, request.logprobs),)
        if parser is None:
            return TokenDelta(text, 1, prompt, logprobs=logprobs)
        parsed = parser.feed(text)
        return TokenDelta(parsed.content, 1, prompt, tool_calls=tuple(parsed.tool_calls),
                          logprobs=logprobs)

    @staticmethod
    def _reason(request: GenerationRequest, tools: list[Tool], limit: int | None,
                count: int, available: int) -> FinishReason:
        if limit is not None and count >= limit and count < available:
            return "length"
        if tools and request.tool_choice.mode != "function":
            return "tool_calls"
        return "stop"

    async def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        self._admit(request.model)
        tokens = [len(item.split()) + 1 if isinstance(item, str) else len(item)
                  for item in request.inputs]
        if request.token_budget is not None and sum(tokens) > request.token_budget:
            raise FederationError(
                ErrorCode.INSUFFICIENT_QUOTA,
                f"the input is {sum(tokens)} tokens and the API key's token quota has "
                f"{request.token_budget} left for this request")
        self.embed_requests.append(request)
        self.in_flight += 1
        try:
            for i, item in enumerate(request.inputs):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                yield Embedding(i, embedding_vector(item, request.dimensions or DIMENSIONS),
                                tokens[i])
            yield EmbeddingsFinished(sum(tokens), request.model)
        finally:
            self.in_flight -= 1


def _call_pieces(request: GenerationRequest, tools: Sequence[Tool]) -> list[str]:
    text = call_text(request, tools)
    return [text[i:i + CALL_PIECE] for i in range(0, len(text), CALL_PIECE)]


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
