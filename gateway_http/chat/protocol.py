"""The OpenAI chat-completions wire format: request validation and response objects.

Requests arrive as JSON already parsed (and checked for depth and number
range) by ``gateway_http/body.py``, and are validated with pydantic in strict
mode (no silent "0.5" → 0.5 coercion), then checked for what a text-only
gateway cannot do. Integer fields are bounded by their wire types (``uint32``
token counts, ``int64`` seed), so an oversized value is a 400 naming it, not a
failure converting to protobuf. Every refusal is a FederationError INVALID_ARGUMENT naming
the offending parameter the way OpenAI does (``messages[0].role``). Unknown
fields are accepted, as OpenAI's API does, but logged, so a client relying on
one sees why it has no effect.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.errors import ErrorCode, FederationError
from federation.inference.backend import MAX_STOP_SEQUENCES
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    ResponseFormat,
    Role,
    SamplingParams,
)

log = logging.getLogger(__name__)

UINT32_MAX = 2**32 - 1
"""``max_tokens`` travels as protobuf ``uint32``."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""``seed`` travels as protobuf ``int64``."""


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.info("ignored request fields", extra={
                "model_type": type(self).__name__, "fields": ",".join(sorted(self.model_extra))})
        return self


class MessageIn(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


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


class ChatCompletionRequest(OpenAIBaseModel):
    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageIn] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    n: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool | None = None
    user: str | None = None


_FIELD_NAMES = frozenset(
    (f.alias or name)
    for model in (ChatCompletionRequest, MessageIn, StreamOptions, JsonSchemaIn, ResponseFormatIn)
    for name, f in model.model_fields.items()
)


@dataclass(frozen=True)
class ChatCall:
    """A validated chat-completion request, in domain terms."""

    generation: GenerationRequest
    stream: bool
    include_usage: bool


def parse_chat_request(body: Any, tenant_id: str = "") -> ChatCall:
    """``body``: the parsed JSON body (``None`` when the request had none)."""
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_unsupported(parsed)
    return ChatCall(
        generation=GenerationRequest(
            model=parsed.model,
            messages=tuple(_message(i, m) for i, m in enumerate(parsed.messages)),
            sampling=_sampling(parsed),
            response_format=_response_format(parsed.response_format),
            tenant_id=tenant_id,
        ),
        stream=bool(parsed.stream),
        include_usage=bool(parsed.stream_options and parsed.stream_options.include_usage),
    )


def invalid(param: str | None, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def _validation_error(exc: ValidationError) -> FederationError:
    first = exc.errors(include_url=False)[0]
    param = _param(first["loc"])
    if not param:
        return invalid(None, "The request body must be a JSON object.")
    if first["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'.")
    return invalid(param, f"Invalid value for '{param}': {first['msg']}.")


def _param(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') → 'messages[0].role'; union-branch tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
        else:
            break  # pydantic's union-member tag such as 'str' or 'list[str]'
    return out


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.n is not None and req.n > 1:
        raise invalid("n", "Only n=1 is supported.")
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true.")
    if req.logprobs:
        raise invalid("logprobs", "logprobs are not supported.")
    _check_tools(req)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and (
            fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise invalid("response_format.json_schema",
                      "response_format of type json_schema needs json_schema.schema.")


def _check_tools(req: ChatCompletionRequest) -> None:
    for i, tool in enumerate(req.tools or ()):
        if tool.get("type") != "function":
            raise invalid(f"tools[{i}].type", "Tool type must be 'function'.")
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise invalid("tool_choice", "tool_choice must be 'none', 'auto', 'required' or an "
                                     "object naming a function.")
    if (choice == "required" or isinstance(choice, dict)) and not req.tools:
        raise invalid("tool_choice", "tool_choice requires tools.")
    if req.tools:
        raise invalid("tools", "Tool calling is not supported by this server.")


def _message(i: int, m: MessageIn) -> ChatMessage:
    role: Role = "system" if m.role == "developer" else m.role
    if m.content is None:
        if m.role != "assistant":
            raise invalid(f"messages[{i}].content", "Message content is required.")
        return ChatMessage(role, "", m.name or "")
    if isinstance(m.content, str):
        return ChatMessage(role, m.content, m.name or "")
    texts = []
    for j, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"messages[{i}].content[{j}]",
                          "Only text content parts are supported by this server.")
        texts.append(part["text"])
    return ChatMessage(role, "".join(texts), m.name or "")


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
                          fmt.json_schema.name)


# ---- responses ---------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage_object(finished: GenerationFinished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.total_tokens,
    }


def completion_object(cid: str, model: str, text: str, finished: GenerationFinished
                      ) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finished.finish_reason,
        }],
        "usage": usage_object(finished),
    }


class ChunkWriter:
    """Builds ``chat.completion.chunk`` SSE events for one stream."""

    def __init__(self, cid: str, model: str, include_usage: bool) -> None:
        self._head = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                      "model": model, "system_fingerprint": None}
        self._include_usage = include_usage

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {**self._head, "choices": choices, **extra}
        if self._include_usage and "usage" not in chunk:
            chunk["usage"] = None  # as OpenAI does when include_usage is on
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        return self._event([{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}])

    def usage(self, finished: GenerationFinished) -> bytes:
        return self._event([], usage=usage_object(finished))


DONE = b"data: [DONE]\n\n"
