"""The vault's HTTP routes in the gateway app as deployed (``peers.keys``, ``peers.memory``,
``peers.guardian`` and the database configured): keys minted by the real key authority,
the real guardian and thermal memory nodes, real PostgreSQL, mTLS everywhere."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from federation.config import DatabaseConfig, Settings
from federation.db import Database, DatabaseUnavailable
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.vault import add_vault_routes
from tests.gateway_support import quiesce
from tests.stack_support import MODEL, Stack, federation_stack

SECRETS = "/v1/vault/secrets"


@dataclass
class Keys:
    writer: str
    """Tenant t1: vault:write and vault:read."""
    reader_t2: str
    """Tenant t2: vault:read."""
    admin: str
    """Tenant ops: admin."""
    chat: str
    """Tenant t1: chat only."""


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


@pytest.fixture
async def keys(stack: Stack) -> Keys:
    async def secret(tenant: str, *scopes: str) -> str:
        return (await stack.issue(tenant, list(scopes))).secret

    return Keys(await secret("t1", "vault:write", "vault:read"), await secret("t2", "vault:read"),
                await secret("ops", "admin"), await secret("t1", "chat"))


async def test_create_read_rotate_recover_destroy_over_http(stack: Stack, keys: Keys) -> None:
    status, created, headers = await stack.call("POST", SECRETS, keys.writer,
                                                json={"name": "api-token", "value": "s3cr3t"})
    assert status == 201 and headers["Cache-Control"] == "no-store"
    url, share = f"{SECRETS}/{created['id']}", created["client_share"]
    status, body, _ = await stack.call("GET", url, keys.writer, share=share)
    assert (status, body["value"]) == (200, "s3cr3t")
    status, body, _ = await stack.call("GET", url, keys.writer)
    assert status == 400 and "X-Federation-Share" in body["error"]["message"]
    status, _, _ = await stack.call("GET", url, keys.reader_t2, share=share)
    assert status == 404  # another tenant's key does not see it
    status, _, _ = await stack.call("POST", SECRETS, keys.chat, json={"name": "x", "value": "y"})
    assert status == 403
    status, body, _ = await stack.call("POST", f"{url}/rotate", keys.writer, share=share)
    assert status == 200
    share = body["client_share"]
    status, _, _ = await stack.call("POST", f"{url}/recover", keys.writer,
                                    json={"reason": "lost"})
    assert status == 403  # recovery needs the admin scope
    status, _, _ = await stack.call("POST", f"{url}/recover", keys.admin, json={"reason": ""})
    assert status == 400
    status, body, _ = await stack.call("POST", f"{url}/recover", keys.admin,
                                       json={"reason": "lost device"})
    assert status == 200
    new_share = body["client_share"]
    status, body, _ = await stack.call("GET", url, keys.writer, share=share)
    assert status == 403 and "invalid share" in body["error"]["message"]
    status, listed, _ = await stack.call("GET", SECRETS, keys.writer)
    assert [s["name"] for s in listed["data"]] == ["api-token"]
    assert new_share not in str(listed)
    status, body, _ = await stack.call("DELETE", f"{url}?reason=done", keys.writer)
    assert status == 200 and body["state"] == "destroyed"
    status, _, _ = await stack.call("GET", url, keys.writer, share=new_share)
    assert status == 409


@pytest.mark.parametrize("secret_id", ["a%00b", "vs_%00", "x" * 300,
                                       "vs_0123456789abcdef0123456Z"])
async def test_an_id_never_issued_is_404_on_every_route(stack: Stack, keys: Keys,
                                                        secret_id: str) -> None:
    _, created, _ = await stack.call("POST", SECRETS, keys.writer,
                                     json={"name": "real", "value": "v"})
    share = created["client_share"]  # well formed, so the id is what is judged
    url = f"{SECRETS}/{secret_id}"
    for method, path, key, kwargs in (
            ("GET", url, keys.writer, {"share": share}),
            ("POST", f"{url}/rotate", keys.writer, {"share": share}),
            ("DELETE", url, keys.writer, {}),
            ("POST", f"{url}/recover", keys.admin, {"json": {"reason": "lost"}})):
        status, body, _ = await stack.call(method, path, key, **kwargs)
        assert (status, body["error"]["code"]) == (404, "not_found"), (method, path, body)
        assert len(body["error"]["message"]) < 120  # the id is not echoed whole


async def test_a_value_given_twice_is_refused(stack: Stack, keys: Keys) -> None:
    status, body, _ = await stack.call("POST", SECRETS, keys.writer, json={
        "name": "both", "value": "x", "value_base64": "AAEC"})
    assert (status, body["error"]["param"]) == (400, "value")


async def test_recovery_rate_limit_is_429_with_retry_after(stack: Stack, keys: Keys) -> None:
    _, created, _ = await stack.call("POST", SECRETS, keys.writer,
                                     json={"name": "n", "value": "v"})
    url = f"{SECRETS}/{created['id']}"
    statuses = []
    for _ in range(6):
        status, _, headers = await stack.call("POST", f"{url}/recover", keys.admin,
                                              json={"reason": "drill"})
        statuses.append(status)
        retry_after = headers.get("Retry-After")
    assert statuses == [200] * 5 + [429]
    assert retry_after is not None and int(retry_after) > 3000


async def test_creation_is_503_when_the_guardian_is_down(stack: Stack, keys: Keys) -> None:
    await stack.guardian.stop()
    status, body, headers = await stack.call("POST", SECRETS, keys.writer,
                                             json={"name": "n", "value": "v"})
    assert status == 503
    assert "guardian is unavailable" in body["error"]["message"]
    assert headers.get("Retry-After")


async def test_the_keys_request_rate_applies_to_the_vault_as_to_generations(
        stack: Stack) -> None:
    """``--rpm 3``: a vault call counts as a chat completion does, and the one past the
    limit gets the generation routes' 429 (rate_limit_error, Retry-After)."""
    issued = await stack.keys.IssueKey(kpb.IssueKeyRequest(
        tenant_id="t1", scopes=["vault:write", "vault:read", "chat"], requests_per_minute=3))
    key = issued.secret
    status, created, _ = await stack.call("POST", SECRETS, key,
                                          json={"name": "n", "value": "v"})
    assert status == 201
    assert (await stack.call("GET", SECRETS, key))[0] == 200
    status, read, _ = await stack.call("GET", f"{SECRETS}/{created['id']}", key,
                                       share=created["client_share"])
    assert (status, read["value"]) == (200, "v")
    status, refused, headers = await stack.call("GET", SECRETS, key)
    assert status == 429, refused
    chat_status, chat_refused, chat_headers = await stack.call(
        "POST", "/v1/chat/completions", key,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert chat_status == 429, chat_refused
    assert (refused["error"]["type"], refused["error"]["code"]) == (
        chat_refused["error"]["type"], chat_refused["error"]["code"]) == (
        "rate_limit_error", "resource_exhausted")
    assert refused["error"]["message"].startswith("request rate limit reached for API key")
    assert 1 <= int(headers["Retry-After"]) <= 60 and 1 <= int(chat_headers["Retry-After"]) <= 60
    await quiesce(stack.gateway)  # the refusals' records are delivered from the outbox
    records = [dict(r.payload.attributes) for r in await stack.records("t1", "gateway.request")
               if dict(r.payload.attributes)["key_id"] == issued.key.key_id]
    assert sorted(r["status"] for r in records) == ["200", "200", "201", "429", "429"]


async def test_a_vault_whose_database_does_not_answer_fails_the_start_in_one_line(
        tmp_path: Path) -> None:
    """The vault's migrations connected with asyncpg's own 60 s timeout and its raw
    errors; it now connects as every other start does."""
    with socket.socket() as silent:  # accepts nothing: connecting waits for the timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        port = silent.getsockname()[1]
        settings = Settings(home=tmp_path, database=DatabaseConfig(
            url=f"postgresql://nobody@127.0.0.1:{port}/federation",
            connect_timeout_seconds=0.5))
        app = web.Application()
        add_vault_routes(app, settings, None)
        runner = web.AppRunner(app)
        async with asyncio.timeout(10):
            with pytest.raises(DatabaseUnavailable, match=f"cannot connect to PostgreSQL at "
                                                          f"127.0.0.1:{port}: no answer"):
                await runner.setup()
        await runner.cleanup()
