"""The council over HTTP: /v1/council/vote (JSON and SSE) and the ``council`` OpenAI models,
through the real gateway app, the council node and scripted members on an inference node."""

from __future__ import annotations

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
    MODEL,
    Script,
    ScriptedCouncilBackend,
    busy,
    vote_json,
)
from federation.db import Database
from gateway_http.app import GatewayServer
from gateway_http.council_routes import OPENAPI_PATHS, add_council_routes, council_model_objects
from tests.council_support import CouncilStack, council_stack
from tests.gateway_support import FakeAudit, FakeKeys, gateway_settings
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)

KEYS = {
    "sk-council": ("council",),
    "sk-chiefs": ("council", "council:chiefs"),
    "sk-audit": ("council", "memory:audit"),
    "sk-chat": ("chat",),
}


@dataclass
class Env:
    stack: CouncilStack
    server: GatewayServer
    keys: FakeKeys
    audit: FakeAudit
    backend: ScriptedCouncilBackend
    scripts: dict[str, Script]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def post(self, body: dict[str, Any], key: str = "sk-council"
                   ) -> tuple[int, CIMultiDict[str], Any]:
        async with aiohttp.ClientSession() as session, session.post(
            self.base + "/v1/council/vote", json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            text = await response.text()
            ctype = response.headers.get("Content-Type", "")
            payload = json.loads(text) if ctype.startswith("application/json") else text
            return response.status, CIMultiDict(response.headers), payload

    def client(self, key: str = "sk-council") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)


@pytest.fixture
async def env(home: Path, database: Database) -> AsyncIterator[Env]:
    pki = TestPKI(home)
    scripts: dict[str, Script] = {
        "crawdad": Script([vote_json("approve", 0.8, "ok", ["rotate keys"])])}
    backend = ScriptedCouncilBackend(scripts=scripts)
    async with council_stack(pki, database, backend) as stack:
        keys, audit = FakeKeys(), FakeAudit()
        for secret, scopes in KEYS.items():
            keys.add(secret, "key_" + secret[3:], "tenant_a", scopes)
        base = gateway_settings(home, [stack.router.nodes[0].address],
                                route_refresh_seconds=60)
        settings = dataclasses.replace(
            base, peers=dataclasses.replace(base.peers, council=stack.council_address))
        server = GatewayServer(settings, pki.identity("gateway"), keys=keys, audit=audit)
        add_council_routes(server.app)
        await server.start()
        try:
            yield Env(stack, server, keys, audit, backend, scripts)
        finally:
            await server.stop()


async def test_vote_returns_the_answer_at_level_one(env: Env) -> None:
    status, headers, body = await env.post({"question": "Deploy to production?"})
    assert status == 200, body
    assert body["answer"] == "Proceed." and body["decision"] == "authorized"
    assert 0.8 < body["confidence"] <= 1
    assert body["request_id"] == headers["x-request-id"]
    assert body["quorum"] == {"asked": 7, "voted": 7, "required": 5, "missing": []}
    assert "members" not in body and "audit_sequences" not in body
    await env.server.state.background.drain()
    assert ("key_council", 0, True) in env.keys.charges
    assert any(c[0] == "key_council" and c[1] > 0 and not c[2] for c in env.keys.charges)
    assert [(e.route, e.model, e.status) for e in env.audit.entries] == [
        ("/v1/council/vote", "council", 200)]


async def test_levels_need_their_scopes(env: Env) -> None:
    status, _, body = await env.post({"question": "q?", "level": 2})
    assert status == 403
    assert body["error"]["type"] == "permission_error" and "council:chiefs" in body[
        "error"]["message"]
    status, _, body = await env.post({"question": "q?"}, key="sk-chat")
    assert status == 403
    status, _, body = await env.post({"question": "q?", "level": 2}, key="sk-chiefs")
    assert status == 200 and len(body["members"]) == 7
    crawdad = next(m for m in body["members"] if m["member"] == "crawdad")
    assert crawdad == {"member": "crawdad", "name": "Crawdad", "specialty": "security",
                       "round": 1, "stance": "approve", "confidence": 0.8,
                       "concerns": ["rotate keys"]}
    status, _, body = await env.post({"question": "q?", "level": 4}, key="sk-audit")
    assert status == 200 and body["audit_sequences"]
    assert all("rationale" in m and "prompt_sha256" in m for m in body["members"])
    assert env.backend.calls["chair"] == 2  # the refused calls never reached the council


async def test_bad_bodies_are_400(env: Env) -> None:
    for body, param in [({}, "question"), ({"question": "q", "rounds": 5}, "rounds"),
                        ({"question": "q", "level": "2"}, "level"),
                        ({"question": "q", "council": "legal"}, None)]:
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
        headers={"Authorization": "Bearer sk-chiefs"},
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
    async with env.client("sk-chat") as client:
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
