"""The gateway under faults of its neighbours and of hostile callers, against the real key
authority, thermal memory and guardian nodes (real PostgreSQL, mTLS).

* Per-source suspension holds at the gateway: one source's verdict never answers another.
* Audit records of refused requests survive a memory outage and a gateway restart
  (the durable outbox), and the gateway refuses to serve what it could not audit.
"""

from __future__ import annotations

import contextlib
import secrets
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from federation.db import Database
from federation.keys import keyformat
from gateway_http.app import GatewayServer
from tests.stack_support import MODEL, Stack, federation_stack

CHAT = "/v1/chat/completions"


def chat_body(model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}]}


def forged_key(key_id: str) -> str:
    """A wrong secret with a valid checksum, as an attacker would compute it."""
    body = f"fed_{key_id}_" + "".join(secrets.choice(string.ascii_letters) for _ in range(43))
    return body + keyformat.checksum(body)


async def post(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any],
               request_id: str = "") -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id:
        headers["x-request-id"] = request_id
    async with session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


@contextlib.asynccontextmanager
async def session_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from ``address`` (a loopback alias)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


async def test_a_sources_verdict_never_answers_another_source(
        tmp_path: Path, database: Database, pg_url: str) -> None:
    # Long cache lifetimes, so that a leak through the cache cannot hide behind expiry.
    ttls = {"auth_cache_ttl_seconds": 120.0, "auth_negative_cache_ttl_seconds": 120.0}
    async with federation_stack(tmp_path, database, pg_url, gateway_config=ttls) as stack, \
            session_from("127.0.0.1") as holder, session_from("127.0.0.2") as attacker:
        issued = await stack.issue("acme", ["chat"])
        key, url = issued.secret, stack.base + CHAT

        statuses = [(await post(attacker, url, forged_key(issued.key.key_id), chat_body()))[0]
                    for _ in range(200)]
        assert statuses[0] == 401 and statuses[-1] == 403, statuses

        status, body = await post(attacker, url, key, chat_body())
        assert status == 403 and "this source" in body["error"]["message"]
        # The attacker's refusal is cached now; it must not answer the holder...
        assert (await post(holder, url, key, chat_body()))[0] == 200
        # ...and the holder's cached success must not answer the attacker.
        assert (await post(attacker, url, key, chat_body()))[0] == 403
        assert (await post(holder, url, key, chat_body()))[0] == 200


async def refused_records(stack: Stack, tenant: str) -> list[str]:
    """The ids the client sent (``X-Request-Id``, kept as ``client_request_id`` beside the
    gateway's own) of the tenant's audited gateway requests answered 404."""
    records = [dict(r.payload.attributes) for r in await stack.records(tenant, "gateway.request")]
    return sorted(a["client_request_id"] for a in records if a["status"] == "404")


@contextlib.asynccontextmanager
async def memory_down(tmp_path: Path, database: Database, pg_url: str,
                      **gateway: Any) -> AsyncIterator[tuple[Stack, str]]:
    """The whole federation with thermal memory stopped, and a chat key of ``acme``."""
    async with federation_stack(tmp_path, database, pg_url,
                                gateway_config=gateway or None) as stack:
        issued = await stack.issue("acme", ["chat"])
        await stack.memory.stop()
        yield stack, issued.secret


async def test_refusals_are_audited_after_a_memory_outage(
        tmp_path: Path, database: Database, pg_url: str) -> None:
    async with memory_down(tmp_path, database, pg_url) as (stack, key):
        ids = [f"rid-outage-{i}" for i in range(5)]
        for request_id in ids:  # an unknown model: refused, audited through the outbox
            assert (await _post_with_id(stack, key, request_id))[0] == 404
        outbox = stack.gateway.state.outbox
        assert outbox.depth == len(ids)
        assert not await outbox.drain(0.5)  # memory is down: nothing can be delivered

        await stack.memory.start()
        assert await outbox.drain(30)
        assert await refused_records(stack, "acme") == ids


async def _post_with_id(stack: Stack, key: str, request_id: str) -> tuple[int, dict[str, Any]]:
    return await post(stack.http, stack.base + CHAT, key, chat_body("no-such-model"),
                      request_id)


async def test_spooled_records_survive_a_gateway_restart(
        tmp_path: Path, database: Database, pg_url: str) -> None:
    async with memory_down(tmp_path, database, pg_url,
                           outbox_retry_max_seconds=0.5) as (stack, key):
        ids = [f"rid-restart-{i}" for i in range(3)]
        for request_id in ids:
            assert (await _post_with_id(stack, key, request_id))[0] == 404
        slot = stack.gateway.state.outbox.slot
        assert slot is not None and (slot / "entries.jsonl").stat().st_size > 0
        await stack.gateway.stop()  # memory still down: the records stay on disk

        await stack.memory.start()
        restarted = GatewayServer(stack.settings, stack.pki.identity("gateway"))
        await restarted.start()
        try:
            assert await restarted.state.outbox.drain(30)
            assert await refused_records(stack, "acme") == ids  # each exactly once
        finally:
            await restarted.stop()


async def test_a_full_outbox_refuses_new_requests(
        tmp_path: Path, database: Database, pg_url: str) -> None:
    async with memory_down(tmp_path, database, pg_url, outbox_max_records=2) as (stack, key):
        for request_id in ("rid-full-0", "rid-full-1"):
            assert (await _post_with_id(stack, key, request_id))[0] == 404
        status, body = await _post_with_id(stack, key, "rid-full-2")
        assert status == 503 and "audit backlog" in body["error"]["message"]

        await stack.memory.start()
        assert await stack.gateway.state.outbox.drain(30)
        assert (await _post_with_id(stack, key, "rid-full-3"))[0] == 404
