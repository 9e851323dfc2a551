"""What the test does from its own namespace (the operator's laptop), over the network:
the official openai client through the gateway host, raw HTTP for statuses. Prints one
JSON document. Usage: ``client.py COMMAND BASE_URL CA_FILE KEY [ARG]``."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import aiohttp
import openai

MODEL = "test-model"
SLOW_MODEL = "slow-model"
"""Echoes at 4 tokens a second: a stream still running when a host is cut."""


def _client(base: str, ca: str, key: str, http: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, http_client=http,
                              max_retries=0, timeout=60)


async def chat(base: str, ca: str, key: str) -> dict[str, Any]:
    verify = ssl.create_default_context(cafile=ca)
    async with openai.DefaultAsyncHttpxClient(verify=verify) as http:
        client = _client(base, ca, key, http)
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello across hosts"}])
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "streamed across hosts"}],
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    return {"text": reply.choices[0].message.content,
            "streamed": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
            "usage": chunks[-1].usage.total_tokens if chunks[-1].usage else None}


async def _one_stream(session: aiohttp.ClientSession, base: str, key: str, words: int
                      ) -> dict[str, Any]:
    started = time.monotonic()
    body = {"model": SLOW_MODEL, "stream": True,
            "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}
    tokens, error, done = 0, None, False
    async with session.post(base + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
            elif event.get("choices"):
                tokens += 1
    return {"status": response.status, "tokens": tokens, "error": error, "done": done,
            "seconds": time.monotonic() - started}


async def streams(base: str, ca: str, key: str, spec: str) -> dict[str, Any]:
    """``spec``: "COUNT:WORDS" concurrent slow streams; each one's outcome."""
    count, words = (int(x) for x in spec.split(":"))
    context = ssl.create_default_context(cafile=ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        print(json.dumps({"started": count}), flush=True)
        results = await asyncio.gather(*(_one_stream(session, base, key, words)
                                         for _ in range(count)))
    return {"streams": results}


async def status(base: str, ca: str, key: str, path: str) -> dict[str, Any]:
    """One request's HTTP status and body: ``/health`` or a chat completion."""
    context = ssl.create_default_context(cafile=ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        if path == "/health":
            request = session.get(base + path)
        else:
            request = session.post(base + "/v1/chat/completions", headers={
                "Authorization": f"Bearer {key}"}, json={
                "model": MODEL, "messages": [{"role": "user", "content": "during an outage"}]})
        async with request as response:
            return {"status": response.status, "body": await response.text(),
                    "retry_after": response.headers.get("Retry-After")}


def main() -> None:
    command, base, ca, key, *rest = sys.argv[1:]
    handlers = {"chat": lambda: chat(base, ca, key),
                "streams": lambda: streams(base, ca, key, rest[0]),
                "status": lambda: status(base, ca, key, rest[0])}
    print(json.dumps(asyncio.run(handlers[command]())), flush=True)


if __name__ == "__main__":
    main()
