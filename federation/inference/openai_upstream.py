"""A backend that forwards to any OpenAI-compatible upstream (vLLM, llama.cpp server, Ollama).

One ``aiohttp.ClientSession`` per backend so connections are reused across
requests. Generation always streams from the upstream (``stream: true`` with
``include_usage``), so deltas reach the caller as the upstream produces them
and closing our iterator closes the upstream response, which stops the work.

A chat goes to ``/chat/completions`` with its tools, tool choice and logprobs as
the caller gave them; the upstream's streamed tool calls (index, id and name,
then argument pieces) and log probabilities are passed on as they arrive. A raw
prompt goes to ``/completions``; its ``echo`` is answered here, from the prompt's
text. Embeddings go to ``/embeddings``. The bodies and chunks: ``openai_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference import openai_wire
from federation.inference.budget import embedding_token_bound, request_prompt_bound
from federation.inference.deltas import join
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
)

log = logging.getLogger(__name__)

_UPSTREAM_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_ARGUMENT,
    404: ErrorCode.NOT_FOUND,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    422: ErrorCode.INVALID_ARGUMENT,
    429: ErrorCode.RESOURCE_EXHAUSTED,
}


class OpenAIUpstreamBackend:
    def __init__(self, model: ModelConfig) -> None:
        if not model.base_url:
            raise ValueError(f"model {model.id!r}: the openai backend needs base_url")
        self._config = model
        self._base = model.base_url.rstrip("/")
        self._upstream_model = model.upstream_model or model.id
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
        session = self._admit()
        prompt = request_prompt_bound(request)
        if request.prompt is None:
            path, body = "/chat/completions", openai_wire.chat_body(request,
                                                                   self._upstream_model)
        else:
            path = "/completions"
            body = openai_wire.completion_body(request, self._upstream_model, self._info)
        self._in_flight += 1
        try:
            async with self._call(session, path, body) as response:
                first_prompt: int | None = prompt
                if request.prompt is not None and request.prompt.echo:
                    assert request.prompt.text is not None  # completion_body checked it
                    yield TokenDelta(request.prompt.text, 0, prompt, echo=True)
                    first_prompt = None
                async for event in _events(response, request.model, first_prompt):
                    yield event
        finally:
            self._in_flight -= 1

    async def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        session = self._admit()
        bound = sum(embedding_token_bound(item) for item in request.inputs)
        if request.token_budget is not None and bound > request.token_budget:
            raise FederationError(
                ErrorCode.INSUFFICIENT_QUOTA,
                f"the input may be up to {bound} tokens and the API key's token quota has "
                f"{request.token_budget} left for this request")
        body = openai_wire.embeddings_body(request, self._upstream_model)
        self._in_flight += 1
        try:
            async with self._call(session, "/embeddings", body) as response:
                data = await response.json(content_type=None)
                vectors, prompt_tokens = openai_wire.embeddings_from(data, len(request.inputs))
        finally:
            self._in_flight -= 1
        for index, values in enumerate(vectors):
            yield Embedding(index, values, 0)
        yield EmbeddingsFinished(prompt_tokens, request.model)

    def _admit(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "backend not started")
        if self._in_flight >= self._config.queue_capacity:
            raise FederationError(ErrorCode.RESOURCE_EXHAUSTED, "too many requests upstream")
        return self._session

    @contextlib.asynccontextmanager
    async def _call(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any]
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` to the upstream; its failures as FederationErrors."""
        url = self._base + path
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    raise await _upstream_error(response)
                yield response
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream call failed", extra={"url": url, "error": repr(exc)})
            code = ErrorCode.DEADLINE_EXCEEDED if isinstance(exc, TimeoutError) else (
                ErrorCode.UNAVAILABLE)
            raise FederationError(code, "the upstream model server failed") from exc
        except (ValueError, KeyError, TypeError) as exc:  # malformed JSON or shapes
            log.warning("upstream sent malformed data", extra={"error": repr(exc)})
            raise FederationError(ErrorCode.UNAVAILABLE, "the upstream sent bad data") from exc


async def _upstream_error(response: aiohttp.ClientResponse) -> FederationError:
    text = (await response.text())[:2000]
    log.warning("upstream refused", extra={"status": response.status, "body": text})
    code = _UPSTREAM_STATUS.get(response.status, ErrorCode.UNAVAILABLE)
    message = f"upstream answered HTTP {response.status}"
    try:
        error = json.loads(text)["error"]
        detail = error["message"]
        if code is ErrorCode.INVALID_ARGUMENT and isinstance(detail, str):
            message = detail  # the caller's own mistake: worth showing
            if error.get("code") == ErrorCode.CONTEXT_LENGTH_EXCEEDED.value:
                code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    retry = response.headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    return FederationError(code, message, retry_after_seconds=retry_after)


class _SseParser:
    """The ``data:`` payloads of a Server-Sent Events body, fed as it arrives.

    Fed whole network reads, not lines: an upstream's 30-odd events usually arrive in
    one or two reads, and reading line by line (``StreamReader.readline``) suspended
    once per line, the inference node's largest per-request cost after the HTTP call
    itself."""

    def __init__(self) -> None:
        self._partial = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events ``chunk`` completes."""
        lines = (self._partial + chunk).split(b"\n") if self._partial else chunk.split(b"\n")
        self._partial = lines.pop()  # the line still arriving (b"" after a newline)
        return self._payloads(lines)

    def end(self) -> list[bytes]:
        """The payload of an event the body ended without closing."""
        lines, self._partial = ([self._partial] if self._partial else []), b""
        payloads = self._payloads(lines)
        if self._data:
            payloads.append(b"\n".join(self._data))
            self._data = []
        return payloads

    def _payloads(self, lines: list[bytes]) -> list[bytes]:
        """Bytes, not text: orjson parses UTF-8 itself (and refuses it malformed)."""
        payloads: list[bytes] = []
        data = self._data
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    payloads.append(b"\n".join(data))
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        return payloads


async def _sse_reads(response: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The ``data:`` payloads of a Server-Sent Events body, those each network read
    completes together (an empty list when a read completes none)."""
    parser = _SseParser()
    async for chunk in response.content.iter_any():
        yield parser.feed(chunk)
    yield parser.end()


# What may follow ``[DONE]`` before the body ends: normally only the chunked
# encoding's last chunk, sent at once after it.
_TAIL_SECONDS = 0.05
_TAIL_BYTES = 64 * 1024


async def _read_to_end(response: aiohttp.ClientResponse) -> None:
    """Read the end of a finished stream's body so that aiohttp returns the connection
    to its pool: released before its end, the connection is closed, and the next
    request opens a new one (a TCP and, upstream over HTTPS, a TLS handshake per
    request). An upstream that keeps the body open after ``[DONE]`` costs at most
    ``_TAIL_SECONDS`` and its connection, never the answer."""
    content = response.content
    left = _TAIL_BYTES
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(_TAIL_SECONDS):
            while left > 0 and not content.at_eof():
                left -= len(await content.readany()) or left


async def _events(response: aiohttp.ClientResponse, model: str, prompt_bound: int | None
                  ) -> AsyncGenerator[GenerationEvent, None]:
    """Deltas and the finished event. Upstreams stream token by token; the tokens of one
    network read are one delta (32 events a read cost the node ~0.15 ms each way as
    deltas of their own, measured: issue 18; the node would join them before sending).

    The first delta carries ``prompt_bound`` as its prompt count, the upstream's own
    count arriving only with the final usage."""
    reason: FinishReason | None = None
    usage: dict[str, Any] | None = None
    deltas = 0
    done = False
    async for payloads in _sse_reads(response):
        read: list[TokenDelta] = []
        for payload in payloads:
            if payload == b"[DONE]":
                done = True
                break
            chunk = orjson.loads(payload)
            if "error" in chunk:
                raise FederationError(ErrorCode.UNAVAILABLE,
                                      "the upstream failed mid-generation")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue  # one choice is asked for: ignore what no caller asked for
                delta = openai_wire.delta_from(choice, 1, prompt_bound if deltas == 0 else None)
                if delta is not None:
                    deltas += 1
                    read.append(delta)
                if choice.get("finish_reason"):
                    reason = openai_wire.finish_reason(choice["finish_reason"])
        if read:
            yield join(read)
        if done:
            await _read_to_end(response)
            break
    if reason is None:
        raise FederationError(ErrorCode.UNAVAILABLE, "the upstream stream ended early")
    prompt = int(usage.get("prompt_tokens", 0)) if usage else 0
    completion = int(usage.get("completion_tokens", deltas)) if usage else deltas
    yield GenerationFinished(reason, prompt, completion, model)
