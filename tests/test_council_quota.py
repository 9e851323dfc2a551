"""The council is charged against token quotas too: the gateway reserves the vote's worst
case before asking the council node and settles to the usage the council reports.

Real gateway, council node, scripted members on an inference node, key authority and
thermal memory over mTLS and PostgreSQL (``tests/council_support.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from federation.council.scripted_backend import HANG, Script, ScriptedCouncilBackend
from federation.db import Database
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.app import GatewayServer
from tests.council_support import CouncilStack, council_stack, streamed_vote, wait_until_idle
from tests.gateway_support import gateway_settings, quiesce
from tests.keys_support import KeyNodes, key_nodes
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)

TENANT = "tenant_q"
CONTEXT = 4096
"""The scripted members' model context (the gateway's members file names other models,
which no node serves: the largest context it knows stands in for them)."""
FULL_COUNCIL_BOUND = 2 * (7 * CONTEXT + CONTEXT)
"""Seven members and the chair, one round, each call tried twice at most."""


@dataclasses.dataclass
class Env:
    stack: CouncilStack
    server: GatewayServer
    federation: KeyNodes
    backend: ScriptedCouncilBackend

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def key(self, token_quota: int) -> kpb.IssueKeyResponse:
        return await self.federation.issue(TENANT, ("council",), token_quota=token_quota)

    async def vote(self, key: str, **body: Any) -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession() as session, session.post(
            self.base + "/v1/council/vote", json={"question": "Ship it?", **body},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            return response.status, dict(response.headers), await response.json()

    async def used(self, key_id: str) -> int:
        await quiesce(self.server)
        return int((await self.federation.quota(key_id)).tokens_used)


@pytest.fixture
async def env(home: Path, database: Database) -> AsyncIterator[Env]:
    pki = TestPKI(home)
    backend = ScriptedCouncilBackend(scripts={})
    async with (
        council_stack(pki, database, backend) as stack,
        key_nodes(pki, database,
                  memory_address=f"127.0.0.1:{stack.memory_server.port}") as federation,
    ):
        base = federation.wire(gateway_settings(home, [stack.router.nodes[0].address],
                                                route_refresh_seconds=60))
        settings = dataclasses.replace(
            base, peers=dataclasses.replace(base.peers, council=stack.council_address))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        try:
            yield Env(stack, server, federation, backend)
        finally:
            await server.stop()


async def test_a_vote_is_charged_what_the_council_reports(env: Env) -> None:
    issued = await env.key(FULL_COUNCIL_BOUND)
    status, _, body = await env.vote(issued.secret)
    assert status == 200, body
    assert body["usage"]["total_tokens"] > 0
    assert await env.used(issued.key.key_id) == body["usage"]["total_tokens"]


async def test_a_quota_that_cannot_cover_the_council_is_refused_before_it_runs(
    env: Env
) -> None:
    issued = await env.key(FULL_COUNCIL_BOUND - 1)
    status, headers, body = await env.vote(issued.secret)
    assert status == 429
    assert (body["error"]["type"], body["error"]["code"]) == (
        "insufficient_quota", "insufficient_quota")
    assert int(headers["Retry-After"]) > 3000
    async with openai.AsyncOpenAI(base_url=env.base + "/v1", api_key=issued.secret,
                                  max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="council", messages=[{"role": "user", "content": "Ship it?"}])
    assert refused.value.body["code"] == "insufficient_quota"  # type: ignore[index]
    assert sum(env.backend.calls.values()) == 0  # no member was asked
    assert await env.used(issued.key.key_id) == 0
    # A sub-council needs less: the technical council's two members fit.
    status, _, body = await env.vote(issued.secret, council="technical")
    assert status == 200, body
    assert await env.used(issued.key.key_id) == body["usage"]["total_tokens"]


async def test_a_client_leaving_a_vote_is_charged_the_whole_reservation(env: Env) -> None:
    """The council's progress carries no token counts: what the members generated before
    the client left is unknown, so the reservation stays charged in full."""
    issued = await env.key(10 * FULL_COUNCIL_BOUND)
    env.backend.default = Script([HANG])
    async with streamed_vote(env.base, issued.secret) as response:
        async for line in response.content:
            if b'"member_started"' in line:
                break
    await wait_until_idle(env.backend, 5)
    assert await env.used(issued.key.key_id) == FULL_COUNCIL_BOUND
