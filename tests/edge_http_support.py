"""Raw HTTP/1.1 over a loopback socket, for what an HTTP client library will not send
(malformed heads, half a request) and for reading exactly what the gateway answers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object, checking the shape on the way."""
        assert self.headers["content-type"].startswith("application/json"), self.headers
        document = self.json()
        assert set(document) == {"error"}, document
        error: dict[str, Any] = document["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return error


def parse_response(raw: bytes) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    return RawResponse(status, headers, body[: int(length)] if length else body)


async def exchange(port: int, request: bytes, wait_seconds: float = 10.0) -> RawResponse:
    """Send ``request`` and read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(wait_seconds):
            return parse_response(await reader.read())
    finally:
        writer.close()


def request_bytes(method: str, path: str, *, headers: dict[str, str] | None = None,
                  body: bytes = b"", extra_head: bytes = b"") -> bytes:
    """A ``Connection: close`` request; ``extra_head`` is appended to the head raw."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n").encode() + extra_head + b"\r\n" + body
