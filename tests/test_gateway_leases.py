"""Quota leases end to end: the gateway admits a key's requests from a lease the key
authority granted, with no round trip per request, and the limits still hold.

The first tests run one gateway in this process against the real key authority and
thermal memory (real PostgreSQL, mTLS); the last runs two ``federation gateway`` processes
against one key authority and checks what two gateways serve together.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf.duration_pb2 import Duration

from federation.config import Settings
from federation.db import Database
from federation.inference.test_backend import TestBackend
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.app import GatewayServer
from tests.db_support import scratch_database
from tests.gateway_support import gateway_settings, inference_nodes, quiesce
from tests.keys_support import KeyNodes, key_nodes
from tests.stack_support import MODEL, Stack, federation_stack
from tests.support import TestPKI
from tests.test_gateway_quota import gateway_process

pytestmark = pytest.mark.timeout(120)

PROMPT = "a b c d e"
"""The test backend counts 6 prompt tokens and echoes 5: 11 tokens a request."""


@dataclass
class Env:
    server: GatewayServer
    federation: KeyNodes
    tenant: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
async def federation(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KeyNodes]:
    pki = TestPKI(tmp_path_factory.mktemp("gateway-leases") / "home")
    async with scratch_database(pg_admin_url) as database, key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def env(federation: KeyNodes) -> AsyncIterator[Env]:
    pki = federation.pki
    async with inference_nodes(pki, [TestBackend()]) as nodes:
        settings = federation.wire(gateway_settings(
            pki.home, [n.address for n in nodes], auth_cache_ttl_seconds=0.2,
            auth_negative_cache_ttl_seconds=0.2))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        try:
            yield Env(server, federation, "tenant_" + uuid.uuid4().hex[:8])
        finally:
            await server.stop()


async def chat(http: aiohttp.ClientSession, base: str, key: str
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(base + "/v1/chat/completions",
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "max_tokens": 5,
                               "messages": [{"role": "user", "content": PROMPT}]}) as response:
        return (response.status, await response.json(),
                {name.lower(): value for name, value in response.headers.items()})


# ---- the finding: two key-authority round trips per request -----------------------------------

async def test_forty_requests_of_a_key_cost_a_few_leases_not_eighty_round_trips(env: Env
                                                                               ) -> None:
    keys = env.federation
    issued = await keys.issue(env.tenant, requests_per_minute=1000, token_quota=100_000)
    before = {m: keys.rpcs(m) for m in ("ReserveQuota", "SettleQuota", "GrantQuotaLease")}
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            status, body, _ = await chat(http, env.base, issued.secret)
            assert status == 200, body
    assert keys.rpcs("ReserveQuota") == before["ReserveQuota"]  # none per request
    assert keys.rpcs("SettleQuota") == before["SettleQuota"]
    # Leases of 8, then twice what the last served: 8 + 16 + 32 covers 40 requests.
    assert keys.rpcs("GrantQuotaLease") - before["GrantQuotaLease"] <= 3
    await quiesce(env.server)  # ends the lease: its unused budget goes back
    status = await keys.quota(issued.key.key_id)
    assert (status.requests_remaining, status.tokens_used) == (1000 - 40, 40 * 11)
    assert env.server.state.leases is not None and env.server.state.leases.held == 0


async def test_an_idle_lease_is_settled_when_it_expires(env: Env) -> None:
    issued = await env.federation.issue(env.tenant, token_quota=100_000)
    async with aiohttp.ClientSession() as http:
        assert (await chat(http, env.base, issued.secret))[0] == 200
    leases = env.server.state.leases
    assert leases is not None and leases.held == 1
    # The key's counters hold the lease, not the request, until the lease ends ...
    assert (await env.federation.quota(issued.key.key_id)).tokens_used > 11
    lease_seconds = env.server.state.settings.keys.lease_seconds
    async with asyncio.timeout(lease_seconds + 10):  # ... by itself, within its lifetime
        while leases.held or (await env.federation.quota(issued.key.key_id)).tokens_used != 11:  # noqa: ASYNC110 - another process settles it
            await asyncio.sleep(0.1)


async def test_a_key_suspended_after_its_gateway_took_a_lease_is_refused(env: Env) -> None:
    issued = await env.federation.issue(env.tenant, token_quota=100_000)
    async with aiohttp.ClientSession() as http:
        assert (await chat(http, env.base, issued.secret))[0] == 200
        assert env.server.state.leases is not None and env.server.state.leases.held == 1
        await env.federation.suspend(env.tenant, issued.key.key_id)
        # The key authority's record cache (keys.cache_ttl_seconds) and the gateway's
        # verification cache (0.2 s here) expire: verification comes before any lease.
        await asyncio.sleep(Settings().keys.cache_ttl_seconds + 0.5)
        status, body, _ = await chat(http, env.base, issued.secret)
    assert status == 403 and "is suspended" in body["error"]["message"]


# ---- two gateway processes, one key -----------------------------------------------------------

@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


@pytest.mark.parametrize(("limit", "rpm", "quota"), [("rate", 25, 10**6),
                                                     ("tokens", 10_000, 330)])
async def test_two_gateway_processes_under_load_never_exceed_the_key_s_limits(
    stack: Stack, tmp_path: Path, limit: str, rpm: int, quota: int
) -> None:
    tenant = "two_" + limit
    issued = await stack.keys.IssueKey(kpb.IssueKeyRequest(
        tenant_id=tenant, scopes=["chat"], requests_per_minute=rpm, token_quota=quota,
        quota_period=Duration(seconds=3600)))
    stack.backend.token_delay = 0.002  # requests overlap
    answers: list[tuple[int, dict[str, Any], dict[str, str]]] = []
    async with gateway_process(stack, tmp_path / "gw1.log") as first, \
            gateway_process(stack, tmp_path / "gw2.log") as second:
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async def client(i: int) -> None:
                for _ in range(8):
                    answers.append(await chat(http, (first, second)[i % 2], issued.secret))

            await asyncio.gather(*(client(i) for i in range(10)))
        assert time.monotonic() - started < 50  # all within one rate window
    served = [body for status, body, _ in answers if status == 200]
    refused = [(body, headers) for status, body, headers in answers if status != 200]
    tokens = sum(body["usage"]["total_tokens"] for body in served)
    assert len(served) <= rpm and tokens <= quota
    assert len(served) >= 10  # both gateways served while the budget lasted
    code = "resource_exhausted" if limit == "rate" else "insufficient_quota"
    for body, headers in refused:
        assert body["error"]["code"] == code, body
        assert int(headers["retry-after"]) >= 1
    # The processes have stopped: every lease is settled, the counters are exact.
    status = (await stack.keys.CheckQuota(kpb.CheckQuotaRequest(
        key_id=issued.key.key_id))).status
    assert status.tokens_used == tokens
    # Requests the inference node refused (the prompt did not fit the last tokens) count.
    assert rpm - len(answers) <= status.requests_remaining <= rpm - len(served)
    if limit == "rate":
        assert status.requests_remaining == rpm - len(served)
    # Every answered request has its audit record in thermal memory.
    audited = {r.request_id for r in await stack.records(tenant, "gateway.request")}
    assert {headers["x-request-id"] for status, _, headers in answers if status == 200} \
        <= audited


async def test_a_gateway_killed_holding_a_lease_leaves_the_key_over_charged_never_under(
    stack: Stack, tmp_path: Path
) -> None:
    quota = 100_000
    issued = await stack.keys.IssueKey(kpb.IssueKeyRequest(
        tenant_id="killed", scopes=["chat"], token_quota=quota,
        quota_period=Duration(seconds=3600)))
    processes: list[asyncio.subprocess.Process] = []
    async with gateway_process(stack, tmp_path / "gw.log", processes) as base, \
            aiohttp.ClientSession() as http:
        answers = [await chat(http, base, issued.secret) for _ in range(3)]
        processes[0].kill()  # SIGKILL: no settlement, the lease stays charged
        await processes[0].wait()
    served = sum(body["usage"]["total_tokens"] for status, body, _ in answers if status == 200)
    assert served == 3 * 11
    status = (await stack.keys.CheckQuota(kpb.CheckQuotaRequest(
        key_id=issued.key.key_id))).status
    # Over-charged by the unreturned lease, at most a quarter of what remained.
    assert served < status.tokens_used <= served + quota // 4
