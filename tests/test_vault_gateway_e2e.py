"""The vault over HTTP through the gateway app as deployed: keys issued by the real key
authority, the real guardian and memory nodes, real PostgreSQL, mTLS everywhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from federation.db import Database
from federation.v1 import guardian_pb2, guardian_pb2_grpc
from tests.stack_support import Stack, federation_stack

SECRETS = "/v1/vault/secrets"


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


async def until_guardian_is_back(stack: Stack, writer: str) -> dict[str, object]:
    """The first create after the guardian restarts may still meet the gateway's channel
    in reconnect backoff; a client retries after Retry-After, so does this."""
    async with asyncio.timeout(20):
        while True:
            status, body, headers = await stack.call("POST", SECRETS, writer,
                                                     json={"name": "after", "value": "v2"})
            if status == 201:
                return body
            assert status == 503 and "Retry-After" in headers
            await asyncio.sleep(0.2)


async def test_vault_end_to_end_with_the_guardian_stopped_and_back(stack: Stack) -> None:
    writer = (await stack.issue("t1", ["vault:write", "vault:read"])).secret
    admin_key = await stack.issue("ops", ["admin"])
    admin = admin_key.secret
    chat_only = (await stack.issue("t1", ["chat"])).secret

    status, created, headers = await stack.call(
        "POST", SECRETS, writer, json={"name": "db-password", "value": "hunter2"})
    assert status == 201 and headers["Cache-Control"] == "no-store"
    assert created["id"].startswith("vs_") and created["client_share"].startswith("fedshare_")
    url, share = f"{SECRETS}/{created['id']}", created["client_share"]
    status, read, _ = await stack.call("GET", url, writer, share=share)
    assert (status, read["value"]) == (200, "hunter2")
    status, body, _ = await stack.call("POST", SECRETS, chat_only, json={"name": "x", "value": "y"})
    assert status == 403  # the real key authority refuses a key without vault:write

    # An edge or inference identity asking the real guardian for this secret's share.
    rows = await stack.records("t1", "guardian.share.deposit")
    key_id = dict(rows[0].payload.attributes)["key_id"]
    for role in ("edge", "inference"):
        channel = stack.pki.channel(stack.guardian.address, role)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await guardian_pb2_grpc.GuardianServiceStub(channel).ReleaseShare(
                    guardian_pb2.ReleaseShareRequest(
                        tenant_id="t1", object_id=created["id"], key_id=key_id,
                        requested_by_key_id="k", reason="curious"))
        finally:
            await channel.close()
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

    await stack.guardian.stop()
    status, read, _ = await stack.call("GET", url, writer, share=share)
    assert (status, read["value"]) == (200, "hunter2")  # reads do not need the guardian
    status, body, headers = await stack.call("POST", SECRETS, writer,
                                             json={"name": "during", "value": "v"})
    assert status == 503 and "Retry-After" in headers
    assert "guardian is unavailable" in body["error"]["message"]
    status, body, _ = await stack.call("POST", f"{url}/recover", admin,
                                       json={"reason": "lost laptop"})
    assert status == 503 and "guardian is unavailable" in body["error"]["message"]

    await stack.guardian.start()
    after = await until_guardian_is_back(stack, writer)
    status, recovered, _ = await stack.call("POST", f"{url}/recover", admin,
                                            json={"reason": "lost laptop"})
    assert status == 200 and recovered["version"] == 2
    status, read, _ = await stack.call("GET", url, writer, share=recovered["client_share"])
    assert (status, read["value"]) == (200, "hunter2")  # nothing lost
    status, body, _ = await stack.call("GET", url, writer, share=share)
    assert status == 403 and "invalid share" in body["error"]["message"]  # old share is dead
    status, read, _ = await stack.call("GET", f"{SECRETS}/{after['id']}", writer,
                                       share=str(after["client_share"]))
    assert (status, read["value"]) == (200, "v2")
    status, listed, _ = await stack.call("GET", SECRETS, writer)
    assert sorted(s["name"] for s in listed["data"]) == ["after", "db-password"]  # no residue

    # Rate limit: five releases per tenant per hour (one is spent above), the sixth is 429.
    statuses = []
    for n in range(5):
        status, body, headers = await stack.call("POST", f"{url}/recover", admin,
                                                 json={"reason": f"drill {n}"})
        statuses.append(status)
    assert statuses == [200, 200, 200, 200, 429]
    assert body["error"]["type"] and int(headers["Retry-After"]) > 3000

    # Every release is in thermal memory, with who (caller and admin key) and why.
    releases = await stack.records("t1", "guardian.share.release")
    assert len(releases) == 5
    reasons = sorted(dict(r.payload.attributes)["reason"] for r in releases)
    assert reasons == ["drill 0", "drill 1", "drill 2", "drill 3", "lost laptop"]
    for record in releases:
        attributes = dict(record.payload.attributes)
        assert attributes["caller_role"] == "gateway"
        assert attributes["requested_by_key_id"] == admin_key.key.key_id  # who asked
        assert record.actor.endswith("/gateway")


async def test_openapi_lists_the_vault_routes(stack: Stack) -> None:
    async with stack.http.get(stack.base + "/openapi.json") as response:
        document = await response.json()
    assert {"/v1/vault/secrets", "/v1/vault/secrets/{id}", "/v1/vault/secrets/{id}/recover",
            "/v1/vault/secrets/{id}/rotate"} <= set(document["paths"])
    recover = document["paths"]["/v1/vault/secrets/{id}/recover"]["post"]
    assert {"429", "503"} <= set(recover["responses"])
