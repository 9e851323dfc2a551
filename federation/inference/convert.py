"""Conversions between the inference protobuf messages and the domain types.

Shared by the inference servicer (server side) and the router (client side)
so the two ends cannot disagree about a field.
"""

from __future__ import annotations

from typing import Final

from federation.errors import ErrorCode, FederationError
from federation.inference.types import (
    ChatMessage,
    FinishReason,
    FormatType,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    ResponseFormat,
    Role,
    SamplingParams,
)
from federation.v1 import common_pb2, inference_pb2

_ROLE_TO_PB: Final[dict[Role, int]] = {
    "system": inference_pb2.CHAT_ROLE_SYSTEM,
    "user": inference_pb2.CHAT_ROLE_USER,
    "assistant": inference_pb2.CHAT_ROLE_ASSISTANT,
    "tool": inference_pb2.CHAT_ROLE_TOOL,
}
_ROLE_FROM_PB: Final[dict[int, Role]] = {v: k for k, v in _ROLE_TO_PB.items()}
_FORMAT_TO_PB: Final[dict[FormatType, int]] = {
    "text": inference_pb2.RESPONSE_FORMAT_TYPE_TEXT,
    "json_object": inference_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
    "json_schema": inference_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
}
_FORMAT_FROM_PB: Final[dict[int, FormatType]] = {
    **{v: k for k, v in _FORMAT_TO_PB.items()},
    inference_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
}
_FINISH_TO_PB: Final[dict[FinishReason, int]] = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "content_filter": inference_pb2.FINISH_REASON_CONTENT_FILTER,
}
_FINISH_FROM_PB: Final[dict[int, FinishReason]] = {v: k for k, v in _FINISH_TO_PB.items()}


def request_to_pb(request: GenerationRequest) -> inference_pb2.GenerateRequest:
    s = request.sampling
    sampling = inference_pb2.SamplingParams(stop=list(s.stop))
    for name in ("temperature", "top_p", "max_tokens", "seed", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None:
            _set_field(sampling, name, value)
    fmt = request.response_format
    return inference_pb2.GenerateRequest(
        tenant_id=request.tenant_id,
        model=request.model,
        messages=[
            inference_pb2.ChatMessage(role=_ROLE_TO_PB[m.role], content=m.content, name=m.name)  # type: ignore[arg-type]
            for m in request.messages
        ],
        sampling=sampling,
        response_format=inference_pb2.ResponseFormat(
            type=_FORMAT_TO_PB[fmt.type],  # type: ignore[arg-type]
            json_schema=fmt.json_schema,
            schema_name=fmt.schema_name,
        ),
    )


def _set_field(message: inference_pb2.SamplingParams, name: str, value: float) -> None:
    """protobuf refuses a value its field cannot hold (``max_tokens`` is ``uint32``,
    ``seed`` ``int64``) with ValueError: that is the caller's bad argument, named."""
    try:
        setattr(message, name, value)
    except (ValueError, TypeError):
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"Invalid value for '{name}': {value!r} is out of range for this parameter.",
            param=name,
        ) from None


def request_from_pb(pb: inference_pb2.GenerateRequest) -> GenerationRequest:
    messages = []
    for i, m in enumerate(pb.messages):
        role = _ROLE_FROM_PB.get(m.role)
        if role is None:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT, "message role is unspecified",
                param=f"messages[{i}].role",
            )
        messages.append(ChatMessage(role, m.content, m.name))
    s = pb.sampling
    sampling = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        repeat_penalty=s.repeat_penalty if s.HasField("repeat_penalty") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else None,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else None,
    )
    fmt = ResponseFormat(
        type=_FORMAT_FROM_PB.get(pb.response_format.type, "text"),
        json_schema=pb.response_format.json_schema,
        schema_name=pb.response_format.schema_name,
    )
    return GenerationRequest(pb.model, tuple(messages), sampling, fmt, pb.tenant_id)


def finished_to_pb(event: GenerationFinished) -> inference_pb2.GenerationFinished:
    return inference_pb2.GenerationFinished(
        finish_reason=_FINISH_TO_PB[event.finish_reason],  # type: ignore[arg-type]
        usage=common_pb2.Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            total_tokens=event.total_tokens,
        ),
        model=event.model,
    )


def finished_from_pb(pb: inference_pb2.GenerationFinished) -> GenerationFinished:
    return GenerationFinished(
        finish_reason=_FINISH_FROM_PB.get(pb.finish_reason, "stop"),
        prompt_tokens=pb.usage.prompt_tokens,
        completion_tokens=pb.usage.completion_tokens,
        model=pb.model,
    )


def model_to_pb(info: ModelInfo) -> inference_pb2.Model:
    return inference_pb2.Model(
        id=info.id, owned_by=info.owned_by, backend=info.backend,
        context_length=info.context_length,
    )


def model_from_pb(pb: inference_pb2.Model) -> ModelInfo:
    return ModelInfo(pb.id, pb.owned_by, pb.backend, pb.context_length)
