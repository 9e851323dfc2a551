"""A deterministic OpenAI-compatible upstream, the stand-in for vLLM behind the ``openai``
backend (the real upstream lives outside the federation, so a double is right here).

It speaks OpenAI's wire format on ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings``, streaming and not, as vLLM and OpenAI do: a chat stream opens with
the assistant role, streams a tool call as its index, id, type and name first and its
arguments in pieces, ends with ``finish_reason: "tool_calls"``, then a usage chunk
(``include_usage``) and ``[DONE]``. What it answers is the test backend's deterministic
answer (``federation.inference.test_backend``), unless a *script* rule matches the
conversation's last message: ``{"when": substring, "call": {"name", "arguments"}}``
calls a tool, ``{"when": substring, "say": text}`` answers text. The script lets the
peer conformance suite's multi-turn tool cases run through a whole federation
(``python -m tests.openai_upstream --port 8000 --script tests/conformance_upstream.json``);
it proves the federation carries tools, calls and their results both ways, not any
model's judgement.

It records every body it was sent (``bodies``), so tests see what the federation
forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from federation.inference.test_backend import TestBackend, embedding_vector
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    TextPrompt,
    TokenDelta,
    Tool,
    ToolCall,
    ToolChoice,
)

PROMPT_TOKENS = 11
"""The prompt tokens this upstream reports for every request."""


@dataclass
class Rule:
    when: str
    call: dict[str, Any] | None = None
    say: str | None = None


@dataclass
class OpenAIUpstream:
    rules: list[Rule] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    token_delay: float = 0.0
    status: int = 200
    """Answer every request with this status (an OpenAI error body) when not 200."""
    error: dict[str, Any] = field(default_factory=lambda: {"message": "slow down"})
    """The error object of those answers."""
    open_streams: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    async def _refused(self, http: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body = await http.json()
        self.bodies.append(body)
        if self.status == 200:
            return body, None
        return body, web.json_response({"error": self.error},
                                       status=self.status, headers={"Retry-After": "7"})

    # ---- chat ----------------------------------------------------------------------------

    async def chat(self, http: web.Request) -> web.StreamResponse:
        body, refused = await self._refused(http)
        if refused is not None:
            return refused
        request = _chat_request(body)
        scripted = self._scripted(request)
        if scripted is not None:
            request = scripted
        events = [e async for e in TestBackend((request.model,)).generate(request)]
        if not body.get("stream"):
            return web.json_response(_chat_completion(body, events))
        return await self._stream(http, body, events, _chat_chunks)

    def _scripted(self, request: GenerationRequest) -> GenerationRequest | None:
        """A request whose test-backend answer is what the matching rule says."""
        last = request.messages[-1].content if request.messages else ""
        rule = next((r for r in self.rules if r.when in last), None)
        if rule is None:
            return None
        if rule.say is not None:
            return GenerationRequest(request.model, (ChatMessage("user", rule.say),),
                                     request.sampling)
        assert rule.call is not None
        tool = next((t for t in request.tools if t.name == rule.call["name"]), None)
        if tool is None or request.tool_choice.mode == "none":
            return None
        said = f"{tool.name} {json.dumps(rule.call['arguments'])}"
        return GenerationRequest(request.model, (ChatMessage("user", said),),
                                 request.sampling, tools=(tool,),
                                 tool_choice=ToolChoice("required"))

    async def _stream(self, http: web.Request, body: dict[str, Any], events: list[Any],
                      chunks: Any) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(http)
        self.open_streams += 1
        try:
            for chunk in chunks(body, events):
                await asyncio.sleep(self.token_delay)
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
        finally:
            self.open_streams -= 1
        return response

    # ---- completions -----------------------------------------------------------------------

    async def completions(self, http: web.Request) -> web.StreamResponse:
        body, refused = await self._refused(http)
        if refused is not None:
            return refused
        prompt = body["prompt"]
        text_prompt = TextPrompt(prompt, ()) if isinstance(prompt, str) else \
            TextPrompt(None, tuple(prompt))
        request = GenerationRequest(
            body["model"], (), _sampling(body),
            prompt=TextPrompt(text_prompt.text, text_prompt.token_ids, body.get("suffix", "")),
            logprobs=body.get("logprobs"))
        events = [e async for e in TestBackend((request.model,)).generate(request)]
        if not body.get("stream"):
            return web.json_response(_text_completion(body, events))
        return await self._stream(http, body, events, _text_chunks)

    # ---- embeddings -----------------------------------------------------------------------

    async def embeddings(self, http: web.Request) -> web.Response:
        body, refused = await self._refused(http)
        if refused is not None:
            return refused
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        data = []
        for i, item in enumerate(inputs):
            vector = embedding_vector(item if isinstance(item, str) else tuple(item),
                                      body.get("dimensions") or 8)
            encoded: Any = list(vector)
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        return web.json_response({"object": "list", "data": data, "model": body["model"],
                                  "usage": {"prompt_tokens": 3 * len(inputs),
                                            "total_tokens": 3 * len(inputs)}})


# ---- OpenAI bodies → domain requests ---------------------------------------------------------

def _sampling(body: dict[str, Any]) -> SamplingParams:
    stop = body.get("stop") or ()
    return SamplingParams(max_tokens=body.get("max_tokens"),
                          stop=(stop,) if isinstance(stop, str) else tuple(stop))


def _chat_request(body: dict[str, Any]) -> GenerationRequest:
    messages = tuple(
        ChatMessage(m["role"], _text(m.get("content")), m.get("name") or "",
                    tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                          for c in m.get("tool_calls") or ()),
                    m.get("tool_call_id") or "")
        for m in body["messages"])
    tools = tuple(Tool(t["function"]["name"], t["function"].get("description", ""),
                       json.dumps(t["function"].get("parameters") or {}))
                  for t in body.get("tools") or ())
    choice = body.get("tool_choice", "auto")
    tool_choice = ToolChoice("function", choice["function"]["name"]) \
        if isinstance(choice, dict) else ToolChoice(choice)
    top = body.get("top_logprobs", 0) if body.get("logprobs") else None
    fmt = (body.get("response_format") or {}).get("type", "text")
    return GenerationRequest(body["model"], messages, _sampling(body), ResponseFormat(fmt),
                             tools=tools, tool_choice=tool_choice,
                             parallel_tool_calls=body.get("parallel_tool_calls", True),
                             logprobs=top)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content or ""


# ---- domain events → OpenAI responses --------------------------------------------------------

def _finished(events: list[Any]) -> GenerationFinished:
    finished = events[-1]
    assert isinstance(finished, GenerationFinished)
    return finished


def _usage(events: list[Any]) -> dict[str, int]:
    completion = _finished(events).completion_tokens
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion}


def _chat_logprobs(delta: TokenDelta) -> dict[str, Any] | None:
    if not delta.logprobs:
        return None
    return {"content": [{"token": lp.token, "logprob": lp.logprob,
                         "bytes": list(lp.token_bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                                           "bytes": list(t.token_bytes)} for t in lp.top]}
                        for lp in delta.logprobs]}


def _chat_chunks(body: dict[str, Any], events: list[Any]) -> list[dict[str, Any]]:
    head = {"id": "chatcmpl-upstream", "object": "chat.completion.chunk", "created": 0,
            "model": body["model"]}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    for event in events[:-1]:
        delta: dict[str, Any] = {}
        if event.text:
            delta["content"] = event.text
        if event.tool_calls:
            delta["tool_calls"] = [
                {"index": c.index, **({"id": c.id, "type": "function"} if c.id else {}),
                 "function": {**({"name": c.name} if c.id else {}), "arguments": c.arguments}}
                for c in event.tool_calls]
        if delta or event.logprobs:
            chunks.append({**head, "choices": [{"index": 0, "delta": delta,
                                                "logprobs": _chat_logprobs(event),
                                                "finish_reason": None}]})
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": _finished(events).finish_reason}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "choices": [], "usage": _usage(events)})
    return chunks


def _chat_completion(body: dict[str, Any], events: list[Any]) -> dict[str, Any]:
    text = "".join(e.text for e in events[:-1])
    calls: dict[int, dict[str, Any]] = {}
    for event in events[:-1]:
        for c in event.tool_calls:
            call = calls.setdefault(c.index, {"id": c.id, "type": "function",
                                              "function": {"name": c.name, "arguments": ""}})
            call["function"]["arguments"] += c.arguments
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return {"id": "chatcmpl-upstream", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finished(events).finish_reason}],
            "usage": _usage(events)}


def _text_chunks(body: dict[str, Any], events: list[Any]) -> list[dict[str, Any]]:
    head = {"id": "cmpl-upstream", "object": "text_completion", "created": 0,
            "model": body["model"]}
    chunks = []
    for event in events[:-1]:
        logprobs = None
        if event.logprobs:
            logprobs = {"tokens": [lp.token for lp in event.logprobs],
                        "token_logprobs": [lp.logprob for lp in event.logprobs],
                        "top_logprobs": [{t.token: t.logprob for t in lp.top}
                                         for lp in event.logprobs],
                        "text_offset": [0] * len(event.logprobs)}
        chunks.append({**head, "choices": [{"index": 0, "text": event.text,
                                            "logprobs": logprobs, "finish_reason": None}]})
    chunks.append({**head, "choices": [{"index": 0, "text": "", "logprobs": None,
                                        "finish_reason": _finished(events).finish_reason}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**head, "choices": [], "usage": _usage(events)})
    return chunks


def _text_completion(body: dict[str, Any], events: list[Any]) -> dict[str, Any]:
    return {"id": "cmpl-upstream", "object": "text_completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "text": "".join(e.text for e in events[:-1]),
                         "logprobs": None, "finish_reason": _finished(events).finish_reason}],
            "usage": _usage(events)}


# ---- running it ------------------------------------------------------------------------------

def load_rules(path: Path) -> list[Rule]:
    return [Rule(**rule) for rule in json.loads(path.read_text())]


@contextlib.asynccontextmanager
async def serving(upstream: OpenAIUpstream, port: int = 0) -> AsyncIterator[str]:
    """Serve ``upstream`` on loopback; yields its base URL (``…/v1``)."""
    runner = web.AppRunner(upstream.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def _main(port: int, script: Path | None) -> None:
    upstream = OpenAIUpstream(rules=load_rules(script) if script else [])
    async with serving(upstream, port) as url:
        print(f"OpenAI-compatible test upstream at {url}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--script", type=Path)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, args.script))
