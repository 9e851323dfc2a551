"""A backend that forwards to any OpenAI-compatible upstream (vLLM, llama.cpp server, Ollama).

One ``aiohttp.ClientSession`` per backend so connections are reused across
requests. Generation always streams from the upstream (``stream: true`` with
``include_usage``), so deltas reach the caller as the upstream produces them
and closing our iterator closes the upstream response, which stops the work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import aiohttp

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit, prompt_token_bound
from federation.inference.types import (
    FinishReason,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    TokenDelta,
)

log = logging.getLogger(__name__)

_UPSTREAM_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_ARGUMENT,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    422: ErrorCode.INVALID_ARGUMENT,
    429: ErrorCode.RESOURCE_EXHAUSTED,
}
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
}


def request_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    """The upstream chat-completions body; unset sampling fields are left out.

    With a token budget, ``max_tokens`` is capped to the budget minus an upper bound of
    the prompt (:func:`prompt_token_bound`): the upstream counts the prompt only after
    the fact.
    """
    s = request.sampling
    max_tokens = completion_limit(request.token_budget, prompt_token_bound(request.messages),
                                  s.max_tokens)
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            for m in request.messages
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    optional = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_tokens": max_tokens,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        # An extension vLLM and llama.cpp's server accept; sent only when asked
        # for, since OpenAI itself rejects unknown fields.
        "repetition_penalty": s.repeat_penalty,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if s.stop:
        body["stop"] = list(s.stop)
    fmt = request.response_format
    if fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.schema_name or "response",
                            "schema": json.loads(fmt.json_schema)},
        }
    return body


class OpenAIUpstreamBackend:
    def __init__(self, model: ModelConfig) -> None:
        if not model.base_url:
            raise ValueError(f"model {model.id!r}: the openai backend needs base_url")
        self._config = model
        self._url = model.base_url.rstrip("/") + "/chat/completions"
        self._info = ModelInfo(model.id, model.owned_by, "openai", model.context_length)
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=None,  # a long generation is fine while tokens keep coming
            sock_connect=self._config.connect_timeout_seconds,
            sock_read=self._config.read_timeout_seconds,
        )
        key = self._config.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def models(self) -> Sequence[ModelInfo]:
        return [self._info]

    def load(self) -> LoadSnapshot:
        # The upstream schedules its own batch; we only know what we sent it.
        return LoadSnapshot(self._in_flight, 0, self._config.queue_capacity)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if self._session is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "backend not started")
        if self._in_flight >= self._config.queue_capacity:
            raise FederationError(ErrorCode.RESOURCE_EXHAUSTED, "too many requests upstream")
        body = request_body(request, self._config.upstream_model or self._config.id)
        prompt = prompt_token_bound(request.messages)
        self._in_flight += 1
        try:
            async with self._session.post(self._url, json=body) as response:
                if response.status != 200:
                    raise await _upstream_error(response)
                async for event in _events(response, request.model, prompt):
                    yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream call failed", extra={"url": self._url, "error": repr(exc)})
            code = ErrorCode.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else (
                ErrorCode.UNAVAILABLE)
            raise FederationError(code, "the upstream model server failed") from exc
        except ValueError as exc:  # malformed JSON in the stream
            log.warning("upstream sent malformed data", extra={"error": repr(exc)})
            raise FederationError(ErrorCode.UNAVAILABLE, "the upstream sent bad data") from exc
        finally:
            self._in_flight -= 1


async def _upstream_error(response: aiohttp.ClientResponse) -> FederationError:
    text = (await response.text())[:2000]
    log.warning("upstream refused", extra={"status": response.status, "body": text})
    code = _UPSTREAM_STATUS.get(response.status, ErrorCode.UNAVAILABLE)
    message = f"upstream answered HTTP {response.status}"
    try:
        detail = json.loads(text)["error"]["message"]
        if code is ErrorCode.INVALID_ARGUMENT and isinstance(detail, str):
            message = detail  # the caller's own mistake: worth showing
    except (ValueError, KeyError, TypeError):
        pass
    retry = response.headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    return FederationError(code, message, retry_after_seconds=retry_after)


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The ``data:`` payloads of a Server-Sent Events body, one per event."""
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


async def _events(response: aiohttp.ClientResponse, model: str, prompt_bound: int
                  ) -> AsyncGenerator[GenerationEvent, None]:
    """Deltas (one token each: upstreams stream token by token) and the finished event.

    The first delta carries ``prompt_bound`` as its prompt count, the upstream's own
    count arriving only with the final usage."""
    reason: FinishReason | None = None
    usage: dict[str, Any] | None = None
    deltas = 0
    async for payload in _sse_data(response):
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise FederationError(ErrorCode.UNAVAILABLE, "the upstream failed mid-generation")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                deltas += 1
                yield TokenDelta(text, 1, prompt_bound if deltas == 1 else None)
            if choice.get("finish_reason"):
                reason = _FINISH.get(choice["finish_reason"], "stop")
    if reason is None:
        raise FederationError(ErrorCode.UNAVAILABLE, "the upstream stream ended early")
    prompt = int(usage.get("prompt_tokens", 0)) if usage else 0
    completion = int(usage.get("completion_tokens", deltas)) if usage else deltas
    yield GenerationFinished(reason, prompt, completion, model)
