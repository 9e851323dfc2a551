"""Bad input at the gateway's HTTP edge (issue 13, finding 6): each gets a 400 in
OpenAI's error JSON naming the parameter, never a 500 or aiohttp's text/plain.

Against the gateway as deployed (``tests/stack_support.py``: the real key authority,
memory, guardian and inference nodes over mTLS, real PostgreSQL), and for the council
route a gateway with a real council node (``tests/council_support.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from federation.db import Database
from tests.council_gateway_support import CouncilGateway, council_gateway
from tests.edge_http_support import RawResponse, exchange, parse_response, request_bytes
from tests.stack_support import MODEL, Stack, federation_stack

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
SECRETS = "/v1/vault/secrets"
DEEP = 5000
"""Nesting levels of the deep bodies: Python's json and pydantic give up around 1,000."""


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


def deep_json(levels: int = DEEP) -> bytes:
    return b'{"model": "x", "nested": ' + b"[" * levels + b"]" * levels + b"}"


async def post_raw(stack: Stack, path: str, body: bytes, key: str | None
                   ) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with stack.http.post(stack.base + path, data=body, headers=headers) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, (await response.json())["error"]


async def chat(stack: Stack, key: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    async with stack.http.post(stack.base + CHAT, json=body,
                               headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json()


def assert_invalid(status: int, error: dict[str, Any], param: str | None,
                   *words: str) -> None:
    assert status == 400, error
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_argument"
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


# ---- numbers behind protobuf fields -------------------------------------------------------

async def test_max_tokens_at_2_pow_32_is_400_naming_it(stack: Stack) -> None:
    key = (await stack.issue("t1", ["chat"])).secret
    status, body = await chat(stack, key, max_tokens=2**32)
    assert_invalid(status, body["error"], "max_tokens", "max_tokens", "4294967295")
    status, body = await chat(stack, key, max_tokens=2**32 - 1)
    assert status == 200, body  # the largest uint32 is a valid (if generous) limit


async def test_max_completion_tokens_2_pow_40_is_400_naming_it(stack: Stack) -> None:
    key = (await stack.issue("t1", ["chat"])).secret
    status, body = await chat(stack, key, max_completion_tokens=2**40)
    assert_invalid(status, body["error"], "max_completion_tokens", "max_completion_tokens")


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**40])
async def test_seed_outside_int64_is_400_naming_it(stack: Stack, seed: int) -> None:
    key = (await stack.issue("t1", ["chat"])).secret
    status, body = await chat(stack, key, seed=seed)
    assert_invalid(status, body["error"], "seed", "seed", "64-bit")
    status, body = await chat(stack, key, seed=2**63 - 1)
    assert status == 200, body


async def test_numbers_json_cannot_hold_are_400(stack: Stack) -> None:
    key = (await stack.issue("t1", ["chat"])).secret
    messages = b'"messages": [{"role": "user", "content": "hi"}]'
    for raw, param in ((b'{"model": "m", ' + messages + b', "temperature": 1e999}',
                        "temperature"),
                       (b'{"model": "m", ' + messages + b', "temperature": NaN}', None),
                       (b'{"model": "m", ' + messages + b', "user": ' + b"9" * 5000 + b"}",
                        "user")):
        status, error = await post_raw(stack, CHAT, raw, key)
        assert_invalid(status, error, param)


# ---- nesting ----------------------------------------------------------------------------------

async def test_deep_json_on_chat_is_400_before_authentication(stack: Stack) -> None:
    key = (await stack.issue("t1", ["chat"])).secret
    status, error = await post_raw(stack, CHAT, deep_json(), key)
    assert_invalid(status, error, None, "nested more than 64 levels")
    # Refused while parsing, before any key is looked at: no key gets the same answer.
    status, error = await post_raw(stack, CHAT, deep_json(), None)
    assert_invalid(status, error, None, "nested more than 64 levels")
    status, error = await post_raw(stack, CHAT, deep_json(65), None)
    assert status == 400 and "nested" in error["message"]
    status, error = await post_raw(stack, CHAT, deep_json(63), None)  # deep enough, then 401
    assert status == 401, error


async def test_deep_json_on_the_vault_is_400(stack: Stack) -> None:
    key = (await stack.issue("t1", ["vault:write"])).secret
    status, error = await post_raw(stack, SECRETS, deep_json(), key)
    assert_invalid(status, error, None, "nested more than 64 levels")
    status, error = await post_raw(stack, SECRETS + "/vs_0/recover", deep_json(), key)
    assert_invalid(status, error, None, "nested more than 64 levels")


# ---- vault ------------------------------------------------------------------------------------

async def test_vault_page_token_holding_a_nul_is_400_naming_it(stack: Stack) -> None:
    key = (await stack.issue("t1", ["vault:read"])).secret
    for text in ("2026-01-01T00:00:00+00:00|vs_\x00", "2026-01-01T00:00:00|vs_1",
                 "not a time|vs_1"):
        token = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
        status, body, _ = await stack.call("GET", f"{SECRETS}?page_token={token}", key)
        assert_invalid(status, body["error"], "page_token", "page_token")


async def test_vault_page_size_that_is_not_an_integer_is_400(stack: Stack) -> None:
    key = (await stack.issue("t1", ["vault:read"])).secret
    for size in ("x", "1e3", "-1", "--5", "٣", "9" * 30):
        status, body, _ = await stack.call("GET", f"{SECRETS}?page_size={size}", key)
        assert_invalid(status, body["error"], "page_size", "page_size")


async def test_vault_value_with_unpaired_surrogates_is_400(stack: Stack) -> None:
    """The fuzzer's 500: unpaired surrogates in ``value_base64`` (base64 of a str that
    cannot be ASCII), with a long name."""
    key = (await stack.issue("t1", ["vault:write"])).secret
    raw = b'{"name": "' + b"n" * 150 + b'", "value_base64": "\\udc8e\\ud800AAAA"}'
    status, error = await post_raw(stack, SECRETS, raw, key)
    assert_invalid(status, error, "value_base64", "surrogate")
    status, body, _ = await stack.call("POST", SECRETS, key,
                                       json={"name": "n", "value_base64": "é=="})
    assert_invalid(status, body["error"], "value_base64", "base64")


async def test_vault_destroy_reason_too_long_is_400(stack: Stack) -> None:
    writer = (await stack.issue("t1", ["vault:write"])).secret
    status, created, _ = await stack.call("POST", SECRETS, writer,
                                          json={"name": "n", "value": "v"})
    assert status == 201
    status, body, _ = await stack.call("DELETE", f"{SECRETS}/{created['id']}", writer,
                                       json={"reason": "r" * 2000})
    assert_invalid(status, body["error"], "reason")


# ---- the HTTP parser's refusals ------------------------------------------------------------

def parser_refusal(response: RawResponse) -> dict[str, Any]:
    assert response.status == 400, response
    # The gateway closed the connection after it (``exchange`` read to the end), as it
    # must: the parser lost its place in the byte stream.
    error = response.error
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_argument"
    assert "\\x00" not in error["message"] and "aaaa" not in error["message"]  # no echo
    return error


async def test_oversized_header_is_json_400(stack: Stack) -> None:
    response = await exchange(stack.gateway.port, request_bytes(
        "GET", "/v1/models", headers={"X-Big": "a" * 9000}))
    error = parser_refusal(response)
    assert "header is longer than 8190 bytes" in error["message"]


async def test_bad_content_length_is_json_400_naming_it(stack: Stack) -> None:
    for value in ("abc", "-1", "1, 2"):
        response = await exchange(stack.gateway.port, request_bytes(
            "POST", CHAT, extra_head=f"Content-Length: {value}\r\n".encode()))
        error = parser_refusal(response)
        assert error["param"] == "Content-Length", error
        assert "Content-Length" in error["message"]


async def test_nul_in_a_header_is_json_400_naming_it(stack: Stack) -> None:
    response = await exchange(stack.gateway.port, request_bytes(
        "GET", "/v1/models", extra_head=b"X-Trace: a\x00b\r\n"))
    error = parser_refusal(response)
    assert error["param"] == "X-Trace" and "header value" in error["message"], error


async def test_bad_chunked_body_is_json_400(stack: Stack) -> None:
    head = request_bytes("POST", CHAT, headers={"Transfer-Encoding": "chunked"})
    response = await exchange(stack.gateway.port, head + b"zz\r\n{}\r\n0\r\n\r\n")
    parser_refusal(response)


# ---- the council ------------------------------------------------------------------------------

async def vote(council: CouncilGateway, body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
            council.base + "/v1/council/vote", data=body,
            headers={"Authorization": f"Bearer {council.key}"}) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


@pytest.fixture
async def council(home: Path, database: Database) -> AsyncIterator[CouncilGateway]:
    async with council_gateway(home, database) as running:
        yield running


async def test_deep_json_on_council_vote_is_400(council: CouncilGateway) -> None:
    deep = b'{"question": "q", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    status, body = await vote(council, deep)
    assert_invalid(status, body["error"], None, "nested more than 64 levels")


async def test_council_vote_integer_question_names_its_type(council: CouncilGateway) -> None:
    status, body = await vote(council, json.dumps({"question": 42}).encode())
    assert_invalid(status, body["error"], "question", "Invalid type for 'question'",
                   "expected a string", "got an integer")
    status, body = await vote(council, b"{}")
    assert_invalid(status, body["error"], "question", "Missing required parameter")
    status, body = await vote(council, json.dumps({"question": "Ship it?"}).encode())
    assert status == 200, body


async def test_bad_chunk_after_the_head_is_json_400_at_once(stack: Stack) -> None:
    """The head is in and the handler waits for the body when the bad chunk comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    writer.write(request_bytes("POST", CHAT, headers={"Transfer-Encoding": "chunked"}))
    await writer.drain()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
    async with asyncio.timeout(10):
        response = parse_response(await reader.read())
    writer.close()
    assert time.monotonic() - started < 5
    parser_refusal(response)
