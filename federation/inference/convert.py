"""Conversions between the inference protobuf messages and the domain types.

Shared by the inference servicer (server side) and the router (client side)
so the two ends cannot disagree about a field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeVar

from federation.errors import ErrorCode, FederationError
from federation.inference.types import (
    ChatMessage,
    Embedding,
    EmbeddingInput,
    EmbeddingRequest,
    EmbeddingsFinished,
    FinishReason,
    FormatType,
    GenerationFinished,
    GenerationRequest,
    ModelInfo,
    ResponseFormat,
    Role,
    SamplingParams,
    TextPrompt,
    TokenDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    TopLogprob,
)
from federation.v1 import common_pb2, inference_pb2

T = TypeVar("T")

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
    "tool_calls": inference_pb2.FINISH_REASON_TOOL_CALLS,
}
_FINISH_FROM_PB: Final[dict[int, FinishReason]] = {v: k for k, v in _FINISH_TO_PB.items()}
_CHOICE_TO_PB: Final[dict[ToolChoiceMode, int]] = {
    "auto": inference_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": inference_pb2.TOOL_CHOICE_MODE_NONE,
    "required": inference_pb2.TOOL_CHOICE_MODE_REQUIRED,
    "function": inference_pb2.TOOL_CHOICE_MODE_FUNCTION,
}
_CHOICE_FROM_PB: Final[dict[int, ToolChoiceMode]] = {
    **{v: k for k, v in _CHOICE_TO_PB.items()},
    inference_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
}
_UINT32_MAX: Final = 2**32 - 1


def request_to_pb(request: GenerationRequest) -> inference_pb2.GenerateRequest:
    s = request.sampling
    sampling = inference_pb2.SamplingParams(stop=list(s.stop))
    for name in ("temperature", "top_p", "max_tokens", "seed", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None:
            _set_field(sampling, name, value)
    fmt = request.response_format
    message = inference_pb2.GenerateRequest(
        tenant_id=request.tenant_id,
        model=request.model,
        messages=[_message_to_pb(m) for m in request.messages],
        sampling=sampling,
        response_format=inference_pb2.ResponseFormat(
            type=_FORMAT_TO_PB[fmt.type],  # type: ignore[arg-type]
            json_schema=fmt.json_schema,
            schema_name=fmt.schema_name,
            strict=fmt.strict,
        ),
        tools=[inference_pb2.Tool(name=t.name, description=t.description,
                                  parameters_json_schema=t.parameters, strict=t.strict)
               for t in request.tools],
        tool_choice=inference_pb2.ToolChoice(
            mode=_CHOICE_TO_PB[request.tool_choice.mode],  # type: ignore[arg-type]
            function_name=request.tool_choice.function),
    )
    if request.token_budget is not None:
        # A quota beyond uint32 is more than any context: the clamp changes nothing real.
        message.token_budget = min(request.token_budget, _UINT32_MAX)
    if not request.parallel_tool_calls:
        message.parallel_tool_calls = False
    if request.logprobs is not None:
        message.logprobs = request.logprobs
    if request.prompt is not None:
        message.prompt.CopyFrom(_prompt_to_pb(request.prompt))
    return message


def _message_to_pb(m: ChatMessage) -> inference_pb2.ChatMessage:
    return inference_pb2.ChatMessage(
        role=_ROLE_TO_PB[m.role],  # type: ignore[arg-type]
        content=m.content, name=m.name, tool_call_id=m.tool_call_id,
        tool_calls=[inference_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                    for c in m.tool_calls],
    )


def _prompt_to_pb(prompt: TextPrompt) -> inference_pb2.TextPrompt:
    message = inference_pb2.TextPrompt(suffix=prompt.suffix, echo=prompt.echo)
    if prompt.text is not None:
        message.text = prompt.text
    else:
        message.token_ids.CopyFrom(_token_ids_to_pb(prompt.token_ids, "prompt"))
    return message


def _token_ids_to_pb(ids: tuple[int, ...], param: str) -> inference_pb2.TokenIds:
    try:
        return inference_pb2.TokenIds(ids=ids)
    except (ValueError, TypeError):
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"Invalid value for '{param}': token ids must be between 0 and {_UINT32_MAX}.",
            param=param) from None


def _prompt_from_pb(pb: inference_pb2.TextPrompt) -> TextPrompt:
    if pb.WhichOneof("content") == "token_ids":
        return TextPrompt(None, tuple(pb.token_ids.ids), pb.suffix, pb.echo)
    return TextPrompt(pb.text, (), pb.suffix, pb.echo)


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


def _enum(known: Mapping[int, T], value: int, param: str) -> T:
    """The domain value of an enum field. proto3 keeps a number it does not know (a
    newer caller's, or garbage) instead of refusing it: refused here, not read as the
    default, which would quietly serve a request other than the one sent."""
    try:
        return known[value]
    except KeyError:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{param} {value} is not defined",
                              param=param) from None


def request_from_pb(pb: inference_pb2.GenerateRequest) -> GenerationRequest:
    messages = []
    for i, m in enumerate(pb.messages):
        role = _ROLE_FROM_PB.get(m.role)
        if role is None:  # unset, or a value this node's protos do not define
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"messages[{i}].role must be system, user, assistant or tool",
                param=f"messages[{i}].role",
            )
        messages.append(ChatMessage(
            role, m.content, m.name,
            tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls), m.tool_call_id))
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
        type=_enum(_FORMAT_FROM_PB, pb.response_format.type, "response_format.type"),
        json_schema=pb.response_format.json_schema,
        schema_name=pb.response_format.schema_name,
        strict=pb.response_format.strict,
    )
    budget = pb.token_budget if pb.HasField("token_budget") else None
    return GenerationRequest(
        pb.model, tuple(messages), sampling, fmt, pb.tenant_id, budget,
        tools=tuple(Tool(t.name, t.description, t.parameters_json_schema, t.strict)
                    for t in pb.tools),
        tool_choice=ToolChoice(_enum(_CHOICE_FROM_PB, pb.tool_choice.mode, "tool_choice.mode"),
                               pb.tool_choice.function_name),
        parallel_tool_calls=(pb.parallel_tool_calls if pb.HasField("parallel_tool_calls")
                             else True),
        logprobs=pb.logprobs if pb.HasField("logprobs") else None,
        prompt=_prompt_from_pb(pb.prompt) if pb.HasField("prompt") else None,
    )


def delta_to_pb(delta: TokenDelta, index: int) -> inference_pb2.TokenDelta:
    message = inference_pb2.TokenDelta(
        text=delta.text, index=index, tokens=delta.tokens, echo=delta.echo,
        tool_calls=[inference_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name,
                                                arguments=c.arguments)
                    for c in delta.tool_calls],
        logprobs=[_logprob_to_pb(lp) for lp in delta.logprobs],
    )
    if delta.prompt_tokens is not None:
        message.prompt_tokens = delta.prompt_tokens
    return message


def _logprob_to_pb(lp: TokenLogprob) -> inference_pb2.TokenLogprob:
    message = inference_pb2.TokenLogprob(
        token=lp.token, token_bytes=lp.token_bytes,
        top_logprobs=[inference_pb2.TopLogprob(token=t.token, logprob=t.logprob,
                                               token_bytes=t.token_bytes) for t in lp.top])
    if lp.logprob is not None:
        message.logprob = lp.logprob
    return message


def delta_from_pb(pb: inference_pb2.TokenDelta) -> TokenDelta:
    return TokenDelta(
        pb.text,
        # 0 from a node that does not count means one token; an echo counts none.
        0 if pb.echo else (pb.tokens or 1),
        pb.prompt_tokens if pb.HasField("prompt_tokens") else None,
        tool_calls=tuple(ToolCallDelta(c.index, c.id, c.name, c.arguments)
                         for c in pb.tool_calls),
        logprobs=tuple(
            TokenLogprob(lp.token, lp.logprob if lp.HasField("logprob") else None,
                         lp.token_bytes,
                         tuple(TopLogprob(t.token, t.logprob, t.token_bytes)
                               for t in lp.top_logprobs))
            for lp in pb.logprobs),
        echo=pb.echo,
    )


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


# ---- embeddings ---------------------------------------------------------------------------

def embed_request_to_pb(request: EmbeddingRequest) -> inference_pb2.EmbedRequest:
    message = inference_pb2.EmbedRequest(
        tenant_id=request.tenant_id, model=request.model,
        inputs=[_embed_input_to_pb(i, item) for i, item in enumerate(request.inputs)])
    if request.dimensions is not None:
        try:
            message.dimensions = request.dimensions
        except ValueError:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "Invalid value for 'dimensions': it is out of range.",
                                  param="dimensions") from None
    if request.token_budget is not None:
        message.token_budget = min(request.token_budget, _UINT32_MAX)
    return message


def _embed_input_to_pb(index: int, item: EmbeddingInput) -> inference_pb2.EmbedInput:
    if isinstance(item, str):
        return inference_pb2.EmbedInput(text=item)
    return inference_pb2.EmbedInput(token_ids=_token_ids_to_pb(item, f"input[{index}]"))


def embed_request_from_pb(pb: inference_pb2.EmbedRequest) -> EmbeddingRequest:
    inputs: list[EmbeddingInput] = [
        tuple(i.token_ids.ids) if i.WhichOneof("content") == "token_ids" else i.text
        for i in pb.inputs]
    return EmbeddingRequest(
        pb.model, tuple(inputs), pb.dimensions if pb.HasField("dimensions") else None,
        pb.tenant_id, pb.token_budget if pb.HasField("token_budget") else None)


def embedding_to_pb(embedding: Embedding) -> inference_pb2.Embedding:
    return inference_pb2.Embedding(index=embedding.index, values=embedding.values,
                                   tokens=embedding.tokens)


def embedding_from_pb(pb: inference_pb2.Embedding) -> Embedding:
    return Embedding(pb.index, tuple(pb.values), pb.tokens)


def embeddings_finished_to_pb(event: EmbeddingsFinished) -> inference_pb2.EmbeddingsFinished:
    return inference_pb2.EmbeddingsFinished(
        usage=common_pb2.Usage(prompt_tokens=event.prompt_tokens,
                               total_tokens=event.prompt_tokens),
        model=event.model)


def embeddings_finished_from_pb(pb: inference_pb2.EmbeddingsFinished) -> EmbeddingsFinished:
    return EmbeddingsFinished(pb.usage.prompt_tokens, pb.model)
