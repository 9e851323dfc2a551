"""The vault's HTTP routes on a real aiohttp server, over the real vault, guardian and memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from federation.errors import ErrorCode, FederationError
from federation.vault.service import VaultService
from gateway_http.auth import KeyPrincipal
from gateway_http.errors import error_middleware
from gateway_http.vault_routes import add_vault_routes
from tests.guardian_support import GuardianNode
from tests.test_vault_service import (  # noqa: F401 - fixtures
    gateway_channel,
    guardian,
    sink,
    store,
    vault,
)

PRINCIPALS = {
    "sk-writer": KeyPrincipal("key_w", "t1", frozenset({"vault:write", "vault:read"})),
    "sk-reader-t2": KeyPrincipal("key_r2", "t2", frozenset({"vault:read"})),
    "sk-admin": KeyPrincipal("key_adm", "ops", frozenset({"admin"})),
    "sk-chat": KeyPrincipal("key_c", "t1", frozenset({"chat"})),
}


class FakeKeys:
    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        principal = PRINCIPALS.get(key)
        if principal is None:
            raise FederationError(ErrorCode.UNAUTHENTICATED, "unknown API key")
        if scope not in principal.scopes:
            raise FederationError(ErrorCode.PERMISSION_DENIED, f"the key lacks scope {scope}")
        return principal

    async def consume(self, key_id: str, *, tokens: int, is_request: bool) -> None:
        return None


@pytest.fixture
async def http(vault: VaultService) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:  # noqa: F811
    app = web.Application(middlewares=[error_middleware])
    add_vault_routes(app, vault=vault, keys=FakeKeys())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield session, str(server.make_url("/v1/vault/secrets"))
    finally:
        await server.close()


def auth(key: str, share: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if share is not None:
        headers["X-Federation-Share"] = share
    return headers


async def test_create_read_rotate_recover_destroy_over_http(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, base = http
    async with session.post(base, json={"name": "api-token", "value": "s3cr3t"},
                            headers=auth("sk-writer")) as resp:
        assert resp.status == 201 and resp.headers["Cache-Control"] == "no-store"
        created = await resp.json()
    url, share = f"{base}/{created['id']}", created["client_share"]
    async with session.get(url, headers=auth("sk-writer", share)) as resp:
        assert resp.status == 200
        assert (await resp.json())["value"] == "s3cr3t"
    async with session.get(url, headers=auth("sk-writer")) as resp:
        assert resp.status == 400
        assert "X-Federation-Share" in (await resp.json())["error"]["message"]
    async with session.get(url, headers=auth("sk-reader-t2", share)) as resp:
        assert resp.status == 404  # another tenant's key does not see it
    async with session.post(base, json={"name": "x", "value": "y"},
                            headers=auth("sk-chat")) as resp:
        assert resp.status == 403
    async with session.post(f"{url}/rotate", headers=auth("sk-writer", share)) as resp:
        assert resp.status == 200
        share = (await resp.json())["client_share"]
    async with session.post(f"{url}/recover", json={"reason": "lost"},
                            headers=auth("sk-writer")) as resp:
        assert resp.status == 403  # recovery needs the admin scope
    async with session.post(f"{url}/recover", json={"reason": ""},
                            headers=auth("sk-admin")) as resp:
        assert resp.status == 400
    async with session.post(f"{url}/recover", json={"reason": "lost device"},
                            headers=auth("sk-admin")) as resp:
        assert resp.status == 200
        new_share = (await resp.json())["client_share"]
    async with session.get(url, headers=auth("sk-writer", share)) as resp:
        assert resp.status == 403 and "invalid share" in (await resp.json())["error"]["message"]
    async with session.get(base, headers=auth("sk-writer")) as resp:
        listed = await resp.json()
        assert [s["name"] for s in listed["data"]] == ["api-token"]
        assert new_share not in str(listed)
    async with session.delete(url, params={"reason": "done"}, headers=auth("sk-writer")) as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "destroyed"
    async with session.get(url, headers=auth("sk-writer", new_share)) as resp:
        assert resp.status == 409


async def test_recovery_rate_limit_is_429_with_retry_after(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    session, base = http
    async with session.post(base, json={"name": "n", "value": "v"},
                            headers=auth("sk-writer")) as resp:
        url = f"{base}/{(await resp.json())['id']}"
    statuses = []
    for _ in range(6):
        async with session.post(f"{url}/recover", json={"reason": "drill"},
                                headers=auth("sk-admin")) as resp:
            statuses.append(resp.status)
            retry_after = resp.headers.get("Retry-After")
    assert statuses == [200] * 5 + [429]
    assert retry_after is not None and int(retry_after) > 3000


async def test_creation_is_503_when_the_guardian_is_down(
    http: tuple[aiohttp.ClientSession, str], guardian: GuardianNode,  # noqa: F811
) -> None:
    session, base = http
    await guardian.server.stop(0)
    async with session.post(base, json={"name": "n", "value": "v"},
                            headers=auth("sk-writer")) as resp:
        assert resp.status == 503
        assert "guardian is unavailable" in (await resp.json())["error"]["message"]
        assert resp.headers.get("Retry-After")
