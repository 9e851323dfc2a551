"""The council over HTTP: /v1/council/vote (JSON and SSE) and the ``council`` OpenAI models,
through the real gateway app, the council node and scripted members on an inference node,
with keys minted by the real key authority and audit in the real thermal memory."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from federation.council.scripted_backend import (
    HANG,
    MODEL,
    Script,
    ScriptedCouncilBackend,
    busy,
    vote_json,
)
from federation.db import Database
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.app import GatewayServer
from gateway_http.council.openapi import OPENAPI_PATHS
from gateway_http.council.routes import council_model_objects
from tests.council_support import CouncilStack, council_stack, streamed_vote, wait_until_idle
from tests.gateway_support import gateway_settings, quiesce
from tests.keys_support import KeyNodes, key_nodes
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)

TENANT = "tenant_a"
RPM = 1000
KEYS = {
    "council": ("council",),
    "chiefs": ("council", "council:chiefs"),
    "audit": ("council", "memory:audit"),
    "chat": ("chat",),
}


@dataclass
class Env:
    stack: CouncilStack
    server: GatewayServer
    federation: KeyNodes
    keys: dict[str, kpb.IssueKeyResponse]
    """Minted by the key authority for ``TENANT``, by name (see ``KEYS``)."""
    backend: ScriptedCouncilBackend
    scripts: dict[str, Script]

    def secret(self, name: str) -> str:
        return self.keys[name].secret

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def post(self, body: dict[str, Any], key: str = "council"
                   ) -> tuple[int, CIMultiDict[str], Any]:
        async with aiohttp.ClientSession() as session, session.post(
            self.base + "/v1/council/vote", json=body,
            headers={"Authorization": f"Bearer {self.secret(key)}"},
        ) as response:
            text = await response.text()
            ctype = response.headers.get("Content-Type", "")
            payload = json.loads(text) if ctype.startswith("application/json") else text
            return response.status, CIMultiDict(response.headers), payload

    def client(self, key: str = "council") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=self.secret(key),
                                  max_retries=0)


@pytest.fixture
async def env(home: Path, database: Database) -> AsyncIterator[Env]:
    pki = TestPKI(home)
    scripts: dict[str, Script] = {
        "crawdad": Script([vote_json("approve", 0.8, "ok", ["rotate keys"])])}
    backend = ScriptedCouncilBackend(scripts=scripts)
    async with (
        council_stack(pki, database, backend) as stack,
        # One thermal memory for the federation: the council's.
        key_nodes(pki, database,
                  memory_address=f"127.0.0.1:{stack.memory_server.port}") as federation,
    ):
        keys = {name: await federation.issue(TENANT, scopes, requests_per_minute=RPM)
                for name, scopes in KEYS.items()}
        base = federation.wire(gateway_settings(home, [stack.router.nodes[0].address],
                                                route_refresh_seconds=60))
        settings = dataclasses.replace(
            base, peers=dataclasses.replace(base.peers, council=stack.council_address))
        server = GatewayServer(settings, pki.identity("gateway"))  # council routes: peers.council
        await server.start()
        try:
            yield Env(stack, server, federation, keys, backend, scripts)
        finally:
            await server.stop()


async def test_vote_returns_the_answer_at_level_one(env: Env) -> None:
    status, headers, body = await env.post({"question": "Deploy to production?"})
    assert status == 200, body
    assert body["answer"] == "Proceed." and body["decision"] == "authorized"
    # Crawdad (weight 1.25 of 7.5) at 0.8, the others at 0.9: 0.88333…, as users read it.
    assert body["confidence"] == 0.883
    assert body["request_id"] == headers["x-request-id"]
    assert body["quorum"] == {"asked": 7, "voted": 7, "required": 5, "missing": []}
    assert "members" not in body and "audit_sequences" not in body
    await quiesce(env.server)
    key_id = env.keys["council"].key.key_id
    # Charged by the key authority: the request before the vote, its tokens after it.
    window = await env.federation.quota(key_id)
    assert window.requests_remaining == RPM - 1 and window.tokens_used > 0
    # Audited in thermal memory: this one request, and nothing else from the gateway.
    (record,) = await env.federation.gateway_records(TENANT)
    attributes = dict(record.payload.attributes)
    assert (attributes["route"], record.subject, attributes["status"]) == (
        "/v1/council/vote", "council", "200")
    assert (record.actor, record.request_id) == (key_id, body["request_id"])


async def test_levels_need_their_scopes(env: Env) -> None:
    status, _, body = await env.post({"question": "q?", "level": 2})
    assert status == 403
    assert body["error"]["type"] == "permission_error" and "council:chiefs" in body[
        "error"]["message"]
    status, _, body = await env.post({"question": "q?"}, key="chat")
    assert status == 403  # refused by the key authority itself:
    assert "lacks the 'council' scope" in body["error"]["message"]
    status, _, body = await env.post({"question": "q?", "level": 2}, key="chiefs")
    assert status == 200 and len(body["members"]) == 7
    crawdad = next(m for m in body["members"] if m["member"] == "crawdad")
    assert crawdad == {"member": "crawdad", "name": "Crawdad", "specialty": "security",
                       "round": 1, "stance": "approve", "confidence": 0.8,
                       "concerns": ["rotate keys"]}
    status, _, body = await env.post({"question": "q?", "level": 4}, key="audit")
    assert status == 200 and body["audit_sequences"]
    assert all("rationale" in m and "prompt_sha256" in m for m in body["members"])
    assert env.backend.calls["chair"] == 2  # the refused calls never reached the council


async def test_bad_bodies_are_400(env: Env) -> None:
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({}, "question"), ({"question": "q", "rounds": 5}, "rounds"),
        ({"question": "q", "level": "2"}, "level"), ({"question": "q", "council": "legal"}, None)]
    for body, param in cases:
        status, _, answer = await env.post(body)
        assert status == 400, body
        if param:
            assert answer["error"]["param"] == param


async def test_quorum_missed_is_503_naming_the_missing(env: Env) -> None:
    for key in ("gecko", "turtle", "raven"):
        env.scripts[key] = Script([busy()])
    status, headers, body = await env.post({"question": "Ship it?"})
    assert status == 503
    assert body["error"]["type"] == "service_unavailable"
    assert "Gecko (resource_exhausted)" in body["error"]["message"]
    assert "Retry-After" in headers


async def test_vote_streams_progress_events_then_the_result(env: Env) -> None:
    env.scripts["spider"] = Script(["garbage", "more garbage"])
    async with aiohttp.ClientSession() as session, session.post(
        env.base + "/v1/council/vote", json={"question": "Ship?", "stream": True, "level": 2},
        headers={"Authorization": f"Bearer {env.secret('chiefs')}"},
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = [line.decode().strip() async for line in response.content]
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    types = [e["type"] for e in events]
    assert types[:7] == ["member_started"] * 7
    assert sorted(types[7:14]) == ["member_failed"] + ["member_voted"] * 6
    assert types[14:] == ["synthesis_started", "result"]
    assert next(e for e in events if e["type"] == "member_failed") == {
        "type": "member_failed", "member": "spider", "round": 1, "reason": "unparseable"}
    voted = next(e for e in events if e["type"] == "member_voted")
    assert voted["vote"]["stance"] == "approve"
    assert events[-1]["quorum"]["missing"] == [{"member": "spider", "reason": "unparseable"}]


async def test_a_client_leaving_the_stream_stops_the_members(env: Env) -> None:
    env.scripts.clear()
    env.backend.default = Script([HANG])
    async with streamed_vote(env.base, env.secret("council")) as response:
        started = 0
        async for line in response.content:
            started += b'"member_started"' in line
            if started == 7:
                break
        async with asyncio.timeout(5):
            while env.backend.in_flight < 7:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    await wait_until_idle(env.backend)  # the connection closed: every member call ended


async def test_a_client_giving_up_on_a_completion_stops_the_members(env: Env) -> None:
    env.scripts.clear()
    env.backend.default = Script([HANG])
    async with env.client() as client:
        with pytest.raises(openai.APITimeoutError):
            await client.with_options(timeout=1.0).chat.completions.create(
                model="council", messages=[{"role": "user", "content": "Hang on?"}])
    await wait_until_idle(env.backend)


async def test_the_council_is_an_openai_model(env: Env) -> None:
    async with env.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="council", messages=[{"role": "user", "content": "Deploy?"}])
        completion = raw.parse()
        assert completion.choices[0].message.content == "Proceed."
        extra = json.loads(raw.text)["council"]
        assert extra["decision"] == "authorized" and extra["quorum"]["voted"] == 7
        assert completion.usage is not None and completion.usage.total_tokens > 0

        stream = await client.chat.completions.create(
            model="council/technical", messages=[{"role": "user", "content": "Cache it?"}],
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Proceed."
        last = next(c for c in chunks if c.choices and c.choices[0].finish_reason == "stop")
        assert last.model_extra and last.model_extra["council"]["quorum"]["asked"] == 2
        assert chunks[-1].usage is not None

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="council/legal", messages=[{"role": "user", "content": "q"}])
    async with env.client("chat") as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(
                model="council", messages=[{"role": "user", "content": "q"}])
        # Other models still reach the normal chat route.
        plain = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}])
        assert plain.choices[0].message.content


async def test_models_and_openapi_fragments(env: Env) -> None:
    ids = [m["id"] for m in council_model_objects(env.server.app)]
    assert ids == ["council", "council/technical", "council/security", "council/ethics",
                   "council/strategic"]
    assert "/v1/council/vote" in OPENAPI_PATHS
