"""The OpenAI wire format as the ``openai`` backend speaks it to an upstream (vLLM,
llama.cpp's server, Ollama): request bodies built from domain requests, and streamed
chunks read back into domain events. No I/O here.

Unset options stay unset in a body: OpenAI itself rejects unknown fields and some
upstreams reject options they do not implement, so only what the caller asked for is
sent.
"""

from __future__ import annotations

import json
from typing import Any, Final

from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit, request_prompt_bound
from federation.inference.types import (
    ChatMessage,
    EmbeddingRequest,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    TokenDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)

_FINISH: Final[dict[str, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the deprecated name of the same thing
}


def finish_reason(value: str) -> FinishReason:
    return _FINISH.get(value, "stop")


def _sampling(request: GenerationRequest, prompt_bound: int) -> dict[str, Any]:
    """Sampling fields; with a token budget ``max_tokens`` is capped to the budget minus
    an upper bound of the prompt (the upstream counts the prompt only after the fact)."""
    s = request.sampling
    max_tokens = completion_limit(request.token_budget, prompt_bound, s.max_tokens)
    fields = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": max_tokens,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        # An extension vLLM and llama.cpp's server accept; sent only when asked for.
        "repetition_penalty": s.repeat_penalty,
    }
    body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if s.stop:
        body["stop"] = list(s.stop)
    return body


def chat_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    """The upstream ``/chat/completions`` body."""
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [_message(m) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        **_sampling(request, request_prompt_bound(request)),
    }
    fmt = request.response_format
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.schema_name or "response",
                            "schema": json.loads(fmt.json_schema),
                            **({"strict": True} if fmt.strict else {})},
        }
    if request.tools:
        body["tools"] = [_tool(t.name, t.description, t.parameters, t.strict)
                         for t in request.tools]
        choice = request.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.function}}
                               if choice.mode == "function" else choice.mode)
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    if request.logprobs is not None:
        body["logprobs"] = True
        if request.logprobs:
            body["top_logprobs"] = request.logprobs
    return body


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role,
                           "content": None if m.tool_calls and not m.content else m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool(name: str, description: str, parameters: str, strict: bool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    if parameters:
        function["parameters"] = json.loads(parameters)
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def completion_body(request: GenerationRequest, upstream_model: str, info: ModelInfo
                    ) -> dict[str, Any]:
    """The upstream ``/completions`` body of a raw prompt. ``echo`` is not sent: the
    backend repeats the prompt's text itself, which a token-id prompt does not have."""
    prompt = request.prompt
    assert prompt is not None
    if prompt.echo and (prompt.text is None or request.logprobs is not None):
        what = "a token-id prompt" if prompt.text is None else "logprobs of the prompt"
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"echo of {what} is not supported "
                              f"by model {info.id}", param="echo")
    body: dict[str, Any] = {
        "model": upstream_model,
        "prompt": prompt.text if prompt.text is not None else list(prompt.token_ids),
        "stream": True,
        "stream_options": {"include_usage": True},
        **_sampling(request, request_prompt_bound(request)),
    }
    if prompt.suffix:
        body["suffix"] = prompt.suffix
    if request.logprobs is not None:
        body["logprobs"] = request.logprobs
    return body


def embeddings_body(request: EmbeddingRequest, upstream_model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": upstream_model,
        "input": [item if isinstance(item, str) else list(item) for item in request.inputs],
        "encoding_format": "float",
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def embeddings_from(data: Any, count: int) -> tuple[list[tuple[float, ...]], int]:
    """The vectors (in input order) and prompt tokens of an upstream's answer; ValueError
    when it does not hold one vector per input."""
    vectors: dict[int, tuple[float, ...]] = {}
    for item in data["data"]:
        vectors[int(item["index"])] = tuple(float(v) for v in item["embedding"])
    if sorted(vectors) != list(range(count)):
        raise ValueError("the upstream did not embed every input")
    usage = data.get("usage") or {}
    return [vectors[i] for i in range(count)], int(usage.get("prompt_tokens", 0))


# ---- streamed chunks -------------------------------------------------------------------------

def delta_from(choice: dict[str, Any], tokens: int, prompt: int | None) -> TokenDelta | None:
    """The domain delta of one streamed choice (chat ``delta`` or completion ``text``);
    ``None`` when it carries nothing."""
    delta = choice.get("delta")
    if delta is None:  # /completions
        text = choice.get("text") or ""
        logprobs = _completion_logprobs(choice.get("logprobs"))
        calls: tuple[ToolCallDelta, ...] = ()
    else:
        text = delta.get("content") or ""
        calls = tuple(_tool_call_delta(c) for c in delta.get("tool_calls") or ())
        logprobs = tuple(_chat_logprob(lp) for lp in
                         ((choice.get("logprobs") or {}).get("content") or ()))
    if not text and not calls and not logprobs:
        return None
    return TokenDelta(text, tokens, prompt, tool_calls=calls, logprobs=logprobs)


def _tool_call_delta(call: dict[str, Any]) -> ToolCallDelta:
    function = call.get("function") or {}
    return ToolCallDelta(int(call.get("index", 0)), call.get("id") or "",
                         function.get("name") or "", function.get("arguments") or "")


def _chat_logprob(lp: dict[str, Any]) -> TokenLogprob:
    return TokenLogprob(
        lp["token"], lp.get("logprob"), _bytes(lp),
        tuple(TopLogprob(t["token"], t["logprob"], _bytes(t))
              for t in lp.get("top_logprobs") or ()))


def _bytes(lp: dict[str, Any]) -> bytes:
    raw = lp.get("bytes")
    return bytes(raw) if isinstance(raw, list) else str(lp["token"]).encode()


def _completion_logprobs(lp: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    """The legacy shape (parallel lists; alternatives as a {token: logprob} map)."""
    if not lp:
        return ()
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or ())
    return tuple(
        TokenLogprob(token, value, token.encode(),
                     tuple(TopLogprob(t, v, t.encode()) for t, v in
                           sorted((top or {}).items(), key=lambda kv: -kv[1])))
        for token, value, top in zip(lp.get("tokens") or (), lp.get("token_logprobs") or (),
                                     tops, strict=False))
