"""The openai backend reads an upstream's SSE stream by network reads, not by lines
(issue 18: a suspension per line was the inference node's largest per-request cost after
the HTTP call). These tests send the same stream cut at every kind of boundary (inside
a line, inside a multi-byte character, between ``\\r`` and ``\\n``, all in one read) from
a real HTTP server, and check the backend reads exactly the text, tokens and end it would
read whole (the events of one network read become one delta).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.openai_upstream import OpenAIUpstreamBackend
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)

PIECES = ["Grüß", " dich", ", 世界", " ✓"]


def _event(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse_body(newline: str) -> bytes:
    """A chat stream as vLLM sends it, with ``newline`` ending each line; one event's
    JSON split over two ``data:`` lines (joined by a newline, which JSON allows)."""
    events = [_event({"role": "assistant", "content": ""})]
    events += [_event({"content": piece}) for piece in PIECES]
    events.append(_event({}, "stop"))
    lines: list[str] = []
    for index, event in enumerate(events):
        text = json.dumps(event, ensure_ascii=False)
        if index == 2:
            half = text.index('"choices"')
            lines += [f"data: {text[:half]}", f"data:{text[half:]}"]
        else:
            lines.append(f"data: {text}")
        lines.append("")
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4,
                                      "total_tokens": 9}}
    lines += [": a comment line", f"data: {json.dumps(usage)}", "", "data: [DONE]", ""]
    return newline.join(lines).encode() + newline.encode()


def cuts(body: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [body]
    if how == "bytes":  # every byte its own write: splits characters and \r\n pairs
        return [body[i:i + 1] for i in range(len(body))]
    size = int(how)
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, dict[str, Any]]]:
    plan: dict[str, Any] = {}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        plan.setdefault("peers", []).append(request.transport.get_extra_info("peername"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in plan["pieces"]:
            await response.write(piece)
            if plan["pause"]:
                await asyncio.sleep(0.001)  # separate reads on the backend's side
        await asyncio.sleep(plan.get("tail_pause", 0.0))  # between [DONE] and the body's end
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/v1", plan
    await runner.cleanup()


async def generate(url: str, times: int = 1) -> tuple[list[TokenDelta], GenerationFinished]:
    """The last of ``times`` generations through one backend (one connection pool)."""
    backend = OpenAIUpstreamBackend(ModelConfig(id="m", backend="openai", base_url=url))
    await backend.start()
    try:
        for _ in range(times):
            events = [e async for e in backend.generate(GenerationRequest(
                "m", (ChatMessage("user", "hi"),), SamplingParams()))]
    finally:
        await backend.stop()
    *deltas, finished = events
    assert all(isinstance(d, TokenDelta) for d in deltas)
    assert isinstance(finished, GenerationFinished)
    return deltas, finished  # type: ignore[return-value]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("how", ["whole", "bytes", "7", "64"])
async def test_events_survive_any_cut_of_the_stream(
    upstream: tuple[str, dict[str, Any]], newline: str, how: str
) -> None:
    url, plan = upstream
    plan["pieces"] = cuts(sse_body(newline), how)
    plan["pause"] = how != "whole"
    deltas, finished = await generate(url)
    assert "".join(d.text for d in deltas) == "".join(PIECES)
    assert sum(d.tokens for d in deltas) == len(PIECES)
    if how == "whole":  # the events of one network read are one delta
        assert len(deltas) == 1
    assert (finished.finish_reason, finished.prompt_tokens, finished.completion_tokens) == (
        "stop", 5, 4)


async def test_a_last_event_without_its_blank_line_is_read(
    upstream: tuple[str, dict[str, Any]]
) -> None:
    """An upstream that ends the body right after its last ``data:`` line (no blank
    line, no newline) still has that event read."""
    url, plan = upstream
    body = sse_body("\n").decode()
    body = body[:body.index("data: [DONE]")]
    finish = json.dumps(_event({"content": "!"}, "length"))
    plan["pieces"] = [body.encode(), f"data: {finish}".encode()]
    plan["pause"] = True
    deltas, finished = await generate(url)
    assert "".join(d.text for d in deltas) == "".join([*PIECES, "!"])
    assert finished.finish_reason == "length"


@pytest.mark.parametrize("bad", [b'data: {"choices": [\n\n', b"data: {\"x\": \"\xff\xfe\"}\n\n"],
                         ids=["broken-json", "bad-utf8"])
async def test_a_malformed_event_is_the_upstreams_failure(
    upstream: tuple[str, dict[str, Any]], bad: bytes
) -> None:
    url, plan = upstream
    body = sse_body("\n")
    plan["pieces"] = [body[:40], bad, body[40:]]
    plan["pause"] = True
    with pytest.raises(FederationError) as caught:
        await generate(url)
    assert caught.value.code is ErrorCode.UNAVAILABLE
    assert caught.value.message == "the upstream sent bad data"


async def test_one_connection_serves_request_after_request(
    upstream: tuple[str, dict[str, Any]]
) -> None:
    """The body's end (the chunked encoding's last chunk) may reach us after ``[DONE]``;
    the backend reads it, so the connection goes back to the pool instead of being
    closed and a new one (a TLS handshake upstream over HTTPS) opened per request."""
    url, plan = upstream
    plan["pieces"] = [sse_body("\n")]
    plan["pause"] = False
    plan["tail_pause"] = 0.005
    deltas, _ = await generate(url, times=3)
    assert "".join(d.text for d in deltas) == "".join(PIECES)
    assert len(plan["peers"]) == 3
    assert len(set(plan["peers"])) == 1, plan["peers"]


async def test_a_body_left_open_after_done_does_not_hold_the_answer(
    upstream: tuple[str, dict[str, Any]]
) -> None:
    url, plan = upstream
    plan["pieces"] = [sse_body("\n")]
    plan["pause"] = False
    plan["tail_pause"] = 2.0
    started = asyncio.get_running_loop().time()
    deltas, finished = await generate(url)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert "".join(d.text for d in deltas) == "".join(PIECES)
    assert finished.finish_reason == "stop"
