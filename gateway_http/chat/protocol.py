"""The OpenAI chat-completions wire format: request validation (the responses are in
``responses.py``).

Requests arrive as JSON already parsed (and checked for depth and number
range) by ``gateway_http/body.py``, and are validated with pydantic in strict
mode (no silent "0.5" → 0.5 coercion), then checked for what this gateway
cannot do. Integer fields are bounded by their wire types (``uint32``
token counts, ``int64`` seed), so an oversized value is a 400 naming it, not a
failure converting to protobuf. Every refusal is a FederationError INVALID_ARGUMENT naming
the offending parameter the way OpenAI does (``messages[0].role``). Unknown
fields are accepted, as OpenAI's API does, but logged, so a client relying on
one sees why it has no effect.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.errors import ErrorCode, FederationError
from federation.inference.backend import MAX_STOP_SEQUENCES
from federation.inference.tools import MAX_TOOLS
from federation.inference.types import (
    MAX_TOP_LOGPROBS,
    ChatMessage,
    GenerationRequest,
    ResponseFormat,
    Role,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)

log = logging.getLogger(__name__)

UINT32_MAX = 2**32 - 1
"""``max_tokens`` travels as protobuf ``uint32``."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""``seed`` travels as protobuf ``int64``."""
MAX_CHOICES: Final = 16
"""Most choices (``n``) one request may ask for: each is a generation of its own."""


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.info("ignored request fields", extra={
                "model_type": type(self).__name__, "fields": ",".join(sorted(self.model_extra))})
        return self


class FunctionCallIn(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCallIn(OpenAIBaseModel):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class JsonSchemaIn(OpenAIBaseModel):
    name: str = Field(default="response", max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormatIn(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None


class FunctionIn(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(OpenAIBaseModel):
    type: str
    function: FunctionIn | None = None


class NamedFunctionIn(OpenAIBaseModel):
    name: str = Field(min_length=1, max_length=64)


class ToolChoiceIn(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunctionIn


class ChatCompletionRequest(OpenAIBaseModel):
    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageIn] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    user: str | None = None


_FIELD_NAMES = frozenset(
    (f.alias or name)
    for model in (ChatCompletionRequest, MessageIn, StreamOptions, JsonSchemaIn, ResponseFormatIn,
                  ToolCallIn, FunctionCallIn, ToolIn, FunctionIn, ToolChoiceIn, NamedFunctionIn)
    for name, f in model.model_fields.items()
)


@dataclass(frozen=True)
class ChatCall:
    """A validated request for generated choices (a chat completion, or a text completion
    through the same pipeline), in domain terms: one generation per choice."""

    generations: tuple[GenerationRequest, ...]
    stream: bool
    include_usage: bool
    n: int = 1
    """Choices per prompt: generations ``i * n`` to ``i * n + n - 1`` answer prompt ``i``."""

    @property
    def generation(self) -> GenerationRequest:
        """The first choice's request (all choices share model, tenant and prompt)."""
        return self.generations[0]

    @property
    def model(self) -> str:
        return self.generation.model

    def with_budget(self, tokens: int | None) -> ChatCall:
        """Each choice's share of a token budget (``None``: no budget)."""
        share = None if tokens is None else tokens // len(self.generations)
        return replace(self, generations=tuple(replace(g, token_budget=share)
                                               for g in self.generations))


def parse_chat_request(body: Any, tenant_id: str = "") -> ChatCall:
    """``body``: the parsed JSON body (``None`` when the request had none)."""
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, _FIELD_NAMES) from None
    _check_unsupported(parsed)
    generation = GenerationRequest(
        model=parsed.model,
        messages=tuple(_message(i, m) for i, m in enumerate(parsed.messages)),
        sampling=_sampling(parsed),
        response_format=_response_format(parsed.response_format),
        tenant_id=tenant_id,
        tools=tuple(_tool(t) for t in parsed.tools or ()),
        tool_choice=_tool_choice(parsed.tool_choice),
        parallel_tool_calls=parsed.parallel_tool_calls is not False,
        logprobs=(parsed.top_logprobs or 0) if parsed.logprobs else None,
    )
    return ChatCall(
        generations=tuple(with_choice_seed(generation, i) for i in range(parsed.n or 1)),
        stream=bool(parsed.stream),
        include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
        n=parsed.n or 1,
    )


def with_choice_seed(generation: GenerationRequest, index: int) -> GenerationRequest:
    """Choice ``index``'s generation: with a ``seed``, choice i samples with seed + i, so
    ``n`` choices differ and the whole answer stays reproducible (one seed for all would
    make every choice the same text)."""
    seed = generation.sampling.seed
    if seed is None or index == 0:
        return generation
    wrapped = (seed + index - INT64_MIN) % 2**64 + INT64_MIN  # stays an int64
    return replace(generation, sampling=replace(generation.sampling, seed=wrapped))


def invalid(param: str | None, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def validation_error(exc: ValidationError, field_names: frozenset[str]) -> FederationError:
    """The first of pydantic's complaints, as OpenAI words it (naming the parameter)."""
    first = exc.errors(include_url=False)[0]
    param = _param(first["loc"], field_names)
    if not param:
        return invalid(None, "The request body must be a JSON object.")
    if first["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'.")
    return invalid(param, f"Invalid value for '{param}': {first['msg']}.")


def _param(loc: tuple[int | str, ...], field_names: frozenset[str]) -> str:
    """('messages', 0, 'role') → 'messages[0].role'; union-branch tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in field_names:
            out += f".{part}" if out else part
        else:
            break  # pydantic's union-member tag such as 'str' or 'list[str]'
    return out


_NOT_IMPLEMENTED: Final[dict[str, tuple[str, tuple[Any, ...]]]] = {
    # parameter: (why it is refused, the values that ask for nothing and so pass)
    "logit_bias": ("logit_bias is not supported.", ({},)),
    "functions": ("functions is deprecated and not supported; use tools.", ([],)),
    "function_call": ("function_call is deprecated and not supported; use tool_choice.",
                      ("none",)),
    "audio": ("Audio output is not supported.", ()),
    "modalities": ("Only the text modality is supported.", (["text"],)),
    "web_search_options": ("Web search is not supported.", ()),
}
"""OpenAI parameters that change what is generated and that this server does not
implement: refused by name, so a caller never takes an answer made without them for one
made with them. Hints that leave the answer as it is (``store``, ``metadata``,
``service_tier``, ``prediction``, …) are ignored and logged, as any unknown field is."""


def _check_not_implemented(extra: dict[str, Any]) -> None:
    for param, (reason, harmless) in _NOT_IMPLEMENTED.items():
        value = extra.get(param)
        if value is not None and value not in harmless:
            raise invalid(param, reason)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    _check_not_implemented(req.model_extra or {})
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true.")
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs requires logprobs to be true.")
    _check_tools(req)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and (
            fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise invalid("response_format.json_schema",
                      "response_format of type json_schema needs json_schema.schema.")
    for i, message in enumerate(req.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise invalid(f"messages[{i}].tool_call_id",
                          "A tool message needs the tool_call_id of the call it answers.")
        if message.tool_calls and message.role != "assistant":
            raise invalid(f"messages[{i}].tool_calls",
                          "Only an assistant message may carry tool_calls.")


def _check_tools(req: ChatCompletionRequest) -> None:
    for i, tool in enumerate(req.tools or ()):
        if tool.type != "function":
            raise invalid(f"tools[{i}].type", "Tool type must be 'function'.")
        if tool.function is None:
            raise invalid(f"tools[{i}].function", "Missing required parameter: "
                                                  f"'tools[{i}].function'.")
    choice = req.tool_choice
    if (choice == "required" or isinstance(choice, ToolChoiceIn)) and not req.tools:
        raise invalid("tool_choice", "tool_choice requires tools.")
    if isinstance(choice, ToolChoiceIn) and choice.function.name not in {
            t.function.name for t in req.tools or () if t.function}:
        raise invalid("tool_choice", f"tool_choice names the function "
                                     f"'{choice.function.name}', which is not among the tools.")


def _message(i: int, m: MessageIn) -> ChatMessage:
    role: Role = "system" if m.role == "developer" else m.role
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments)
                  for c in m.tool_calls or ())
    return ChatMessage(role, _content(i, m), m.name or "", calls, m.tool_call_id or "")


def _content(i: int, m: MessageIn) -> str:
    if m.content is None:
        if m.role != "assistant":
            raise invalid(f"messages[{i}].content", "Message content is required.")
        return ""
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"messages[{i}].content[{j}]",
                          "Only text content parts are supported by this server.")
        texts.append(part["text"])
    return "".join(texts)


def _tool(tool: ToolIn) -> Tool:
    function = tool.function
    assert function is not None  # _check_tools
    parameters = json.dumps(function.parameters) if function.parameters is not None else ""
    return Tool(function.name, function.description or "", parameters, bool(function.strict))


def _tool_choice(choice: str | ToolChoiceIn | None) -> ToolChoice:
    if isinstance(choice, ToolChoiceIn):
        return ToolChoice("function", choice.function.name)
    if choice == "none":
        return ToolChoice("none")
    if choice == "required":
        return ToolChoice("required")
    return ToolChoice("auto")


def _sampling(req: ChatCompletionRequest) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=stop,
        seed=req.seed,
        repeat_penalty=req.repeat_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )


def _response_format(fmt: ResponseFormatIn | None) -> ResponseFormat:
    if fmt is None or fmt.type == "text":
        return ResponseFormat()
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None
    return ResponseFormat("json_schema", json.dumps(fmt.json_schema.schema_),
                          fmt.json_schema.name, strict=fmt.json_schema.strict is True)
