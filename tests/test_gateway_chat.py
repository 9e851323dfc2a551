"""The gateway driven by the official openai SDK, over real mTLS inference nodes, with
the real key authority and thermal memory nodes (real PostgreSQL) behind it.

The key authority and thermal memory are started once for the module (keys are minted
per test, each test on its own tenant); inference nodes and the gateway are per test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from pydantic import BaseModel

from federation.inference.test_backend import TestBackend
from federation.keys import keyformat
from federation.logs import (
    ContextFilter,
    JsonFormatter,
    client_request_id,
    client_request_id_var,
    request_id_var,
)
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.app import GatewayServer
from tests.db_support import scratch_database
from tests.gateway_support import (
    InferenceNode,
    eventually,
    gateway_settings,
    inference_nodes,
    quiesce,
)
from tests.keys_support import KeyNodes, key_nodes
from tests.support import TestPKI

MODEL = "test-model"
RPM = 1000
TOKEN_QUOTA = 1_000_000


@dataclass
class Env:
    nodes: list[InferenceNode]
    server: GatewayServer
    federation: KeyNodes
    tenant: str
    issued: kpb.IssueKeyResponse
    """This test's chat key (tenant ``tenant``, with request and token quotas)."""

    @property
    def key(self) -> str:
        return self.issued.secret

    @property
    def key_id(self) -> str:
        return self.issued.key.key_id

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=key or self.key,
                                  max_retries=0)

    @property
    def backends(self) -> list[TestBackend]:
        return [n.backend for n in self.nodes]

    async def settle(self) -> None:
        """Wait for the background audit/charge tasks of finished requests."""
        await quiesce(self.server)


@pytest.fixture(scope="module")
async def federation(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KeyNodes]:
    pki = TestPKI(tmp_path_factory.mktemp("gateway-chat") / "home")
    async with scratch_database(pg_admin_url) as database, key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def env(federation: KeyNodes) -> AsyncIterator[Env]:
    pki = federation.pki
    tenant = "tenant_" + uuid.uuid4().hex[:8]
    issued = await federation.issue(tenant, ["chat"], requests_per_minute=RPM,
                                    token_quota=TOKEN_QUOTA)
    async with inference_nodes(pki, [TestBackend(), TestBackend()]) as nodes:
        settings = federation.wire(gateway_settings(
            pki.home, [n.address for n in nodes], max_body_bytes=64 * 1024,
            route_refresh_seconds=60))
        server = GatewayServer(settings, pki.identity("gateway"))  # the production clients
        await server.start()
        try:
            yield Env(nodes, server, federation, tenant, issued)
        finally:
            await server.stop()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# ---- happy paths -----------------------------------------------------------------------------

async def test_non_streaming_completion(env: Env) -> None:
    async with env.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user("hello brave new world"))
        completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "hello brave new world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.completion_tokens, completion.usage.prompt_tokens) == (4, 5)
    assert completion.usage.total_tokens == 9
    assert raw.headers["x-request-id"].startswith("req_")


async def test_choices_of_a_seeded_chat_sample_with_consecutive_seeds(env: Env) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=user("hi"), n=3, seed=41)
    assert len(completion.choices) == 3
    requests = [r for backend in env.backends for r in backend.requests]
    assert sorted(r.sampling.seed for r in requests) == [41, 42, 43]


async def test_usage_of_n_choices_counts_the_prompt_once(env: Env) -> None:
    async with env.client() as client:
        one = await client.chat.completions.create(model=MODEL, messages=user("a b c"))
        three = await client.chat.completions.create(model=MODEL, messages=user("a b c"), n=3)
        stream = await client.chat.completions.create(
            model=MODEL, messages=user("a b c"), n=3, stream=True,
            stream_options={"include_usage": True})
        streamed = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # as OpenAI counts it
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert [(u.prompt_tokens, u.completion_tokens) for u in streamed] == [
        (three.usage.prompt_tokens, three.usage.completion_tokens)]


async def test_parameters_that_ask_for_nothing_and_hints_are_accepted(env: Env) -> None:
    body = {"model": MODEL, "messages": user("hi"), "logit_bias": {}, "functions": [],
            "function_call": "none", "modalities": ["text"], "store": False,
            "metadata": {"team": "search"}, "service_tier": "auto"}
    async with env.client() as client:
        completion = await client.post("/chat/completions", body=body, cast_to=object)
    assert isinstance(completion, dict)
    assert completion["choices"][0]["message"]["content"] == "hi"


async def test_sampling_limits_are_applied(env: Env) -> None:
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=user("one two three four five"), max_tokens=2)
    assert completion.choices[0].message.content == "one two"
    assert completion.choices[0].finish_reason == "length"


async def test_streaming_arrives_before_generation_ends(env: Env) -> None:
    for backend in env.backends:
        backend.token_delay = 0.05
    words = "a b c d e f g h"
    started = time.perf_counter()
    arrivals: list[tuple[float, Any]] = []
    async with env.client() as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(words), stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            arrivals.append((time.perf_counter() - started, chunk))
    chunks = [c for _, c in arrivals]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == words
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []  # the usage chunk comes last
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    first_content = next(t for t, c in arrivals if c.choices and c.choices[0].delta.content)
    total = arrivals[-1][0]
    # 8 tokens x 50 ms: the first token must not wait for the other seven.
    assert total >= 0.35
    assert first_content < total - 0.25


async def test_stream_without_usage_has_no_usage_chunk(env: Env) -> None:
    async with env.client() as client:
        stream = await client.chat.completions.create(model=MODEL, messages=user("x y"),
                                                      stream=True)
        chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_models_list_and_retrieve(env: Env) -> None:
    async with env.client() as client:
        listed = await client.models.list()
        assert [m.id for m in listed.data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")


async def test_the_request_id_is_the_gateways_and_a_clients_is_a_label(env: Env) -> None:
    """Two clients sending the same ``X-Request-Id`` (or a client copying another
    tenant's) get ids of their own: the audit trail of one request is never merged with,
    or written into, another's. The client's value is kept as ``client_request_id``."""
    other = await env.federation.issue(env.tenant + "-other", ["chat"])
    answers = []
    for key in (env.key, other.secret):
        async with env.client(key) as client:
            answers.append(await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=user("trace me"),
                extra_headers={"x-request-id": "abc-123"}))
    raw = answers[0]
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_") and request_id != "abc-123"
    assert answers[1].headers["x-request-id"] not in (request_id, "abc-123")
    seen = [rid for b in env.backends for rid in b.request_ids]
    assert request_id in seen and "abc-123" not in seen  # the gRPC metadata carries ours
    await env.settle()
    assert await env.federation.gateway_records(env.tenant, "abc-123") == []
    # The audit record, as thermal memory holds it.
    (record,) = await env.federation.gateway_records(env.tenant, request_id)
    attributes = dict(record.payload.attributes)
    assert (record.request_id, record.actor, record.tenant_id, record.subject) == (
        request_id, env.key_id, env.tenant, MODEL)
    assert (attributes["request_id"], attributes["client_request_id"]) == (
        request_id, "abc-123")
    assert (attributes["key_id"], attributes["route"], attributes["status"]) == (
        env.key_id, "/v1/chat/completions", "200")
    assert (attributes["prompt_tokens"], attributes["completion_tokens"]) == ("3", "2")
    assert "trace me" not in str(record)  # prompts are not stored
    # The charges, as the key authority holds them: the request counted before the
    # response, its 5 tokens after it.
    window = await env.federation.quota(env.key_id)
    assert (window.requests_remaining, window.tokens_used) == (RPM - 1, 5)
    assert window.tokens_remaining == TOKEN_QUOTA - 5


@pytest.mark.parametrize(("sent", "kept"), [
    ("abc-123", "abc-123"), ("01JEZ3Q4W8:trace.7_x", "01JEZ3Q4W8:trace.7_x"),
    ("x" * 128, "x" * 128), ("x" * 129, ""), ("two words", ""), ('a"b', ""),
    ("caf\u00e9", ""), ("", ""), (None, "")])
def test_a_clients_request_id_is_kept_only_when_short_and_plain(sent: str | None,
                                                                 kept: str) -> None:
    assert client_request_id(sent) == kept


def test_log_lines_carry_the_clients_request_id_beside_ours() -> None:
    record = logging.makeLogRecord({"msg": "refused", "name": "gateway_http.test"})
    ours, theirs = request_id_var.set("req_1"), client_request_id_var.set("abc-123")
    try:
        assert ContextFilter().filter(record)
    finally:
        request_id_var.reset(ours)
        client_request_id_var.reset(theirs)
    line = json.loads(JsonFormatter("gateway").format(record))
    assert (line["request_id"], line["client_request_id"]) == ("req_1", "abc-123")


async def test_key_verification_is_cached(env: Env) -> None:
    verified = env.federation.rpcs("VerifyKey")
    async with env.client() as client:
        for _ in range(3):
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert env.federation.rpcs("VerifyKey") - verified == 1  # one round trip, not three
    await env.settle()  # the gateway's quota lease gives back the requests it did not serve
    assert (await env.federation.quota(env.key_id)).requests_remaining == RPM - 3


# ---- errors, through the SDK's typed exceptions ---------------------------------------------

@pytest.mark.parametrize("key", ["sk-wrong", keyformat.generate()[1]],
                         ids=["malformed", "unknown"])
async def test_authentication_errors(env: Env, key: str) -> None:
    async with env.client(key) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"  # type: ignore[index]
    async with aiohttp.ClientSession() as http, http.post(
            env.base + "/v1/chat/completions", json={}) as response:
        assert response.status == 401
        assert "x-request-id" in response.headers


@pytest.mark.parametrize("header", [b"Bearer fed_\xff", "Bearer fed_é".encode("latin-1"),
                                    "Bearer fed_é".encode()])
async def test_a_key_that_is_not_ascii_is_401_not_500(env: Env, header: bytes) -> None:
    host, port = env.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Authorization: " + header + b"\r\n\r\n")
    answer = (await reader.read()).decode("latin-1")
    writer.close()
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert '"malformed API key' in answer


@pytest.mark.parametrize(("kind", "reason"), [("admin-only", "lacks the 'chat' scope"),
                                              ("suspended", "is suspended")])
async def test_permission_errors(env: Env, kind: str, reason: str) -> None:
    issued = await env.federation.issue(env.tenant, ["admin"] if kind == "admin-only" else
                                        ["chat"])
    if kind == "suspended":
        await env.federation.suspend(env.tenant, issued.key.key_id)
    async with env.client(issued.secret) as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert reason in caught.value.message
    assert env.backends[0].started + env.backends[1].started == 0


async def test_unknown_model_is_404(env: Env) -> None:
    async with env.client() as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-9", messages=user("hi"))
    assert caught.value.param == "model"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "fake_role", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ({"model": MODEL, "messages": user("hi"), "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": user("hi"), "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": user("hi"), "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": user("hi"), "stream": False,
      "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": MODEL, "messages": user("hi"), "response_format": {"type": "xml"}},
     "response_format.type"),
    ({"model": MODEL, "messages": user("hi"), "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ({"model": MODEL, "messages": user("hi"), "n": 17}, "n"),
    ({"model": MODEL, "messages": user("hi"), "top_logprobs": 2}, "top_logprobs"),
    ({"model": MODEL, "messages": user("hi"), "tools": [{"type": "function"}]},
     "tools[0].function"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool_call_id"),
    ({"model": MODEL, "messages": user("hi"), "tool_choice": "invalid"}, "tool_choice"),
    ({"model": MODEL, "messages": user("hi"), "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "messages": user("hi"), "tools": [{"type": "invalid"}]}, "tools[0].type"),
    # Not implemented, and each would change the answer: refused, never ignored.
    ({"model": MODEL, "messages": user("hi"), "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"model": MODEL, "messages": user("hi"), "functions": [{"name": "f"}]}, "functions"),
    ({"model": MODEL, "messages": user("hi"), "function_call": "auto"}, "function_call"),
    ({"model": MODEL, "messages": user("hi"), "modalities": ["text", "audio"]}, "modalities"),
    ({"model": MODEL, "messages": user("hi"), "audio": {"voice": "alloy"}}, "audio"),
    ({"model": MODEL, "messages": user("hi"), "web_search_options": {}}, "web_search_options"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_bodies_are_400_naming_the_param(env: Env, body: dict[str, Any],
                                                       param: str, stream: bool) -> None:
    if stream:
        body = {"stream": True, **body}
    async with env.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.post("/chat/completions", body=body, cast_to=object, stream=stream,
                               stream_cls=openai.AsyncStream[object])
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert env.backends[0].started + env.backends[1].started == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_bodies_are_400(env: Env, raw: bytes) -> None:
    headers = {"Authorization": f"Bearer {env.key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(
            env.base + "/v1/chat/completions", data=raw, headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"


async def test_body_too_large_is_413(env: Env) -> None:
    async with env.client() as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("x" * 100_000))
    assert caught.value.status_code == 413
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


async def test_rate_limit_is_429_with_retry_after(env: Env) -> None:
    limited = await env.federation.issue(env.tenant, ["chat"], requests_per_minute=1)
    key_id = limited.key.key_id
    await env.federation.spend_requests(key_id, 1)  # this minute's one request is gone
    async with env.client(limited.secret) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    retry_after = int(caught.value.response.headers["Retry-After"])
    window = await env.federation.quota(key_id)
    reset = window.requests_reset_in.ToTimedelta().total_seconds()
    assert window.requests_remaining == 0
    # The key authority's own wait, rounded up (read a moment after the refusal).
    assert math.ceil(reset) <= retry_after <= math.ceil(reset) + 1 and retry_after <= 60
    refusals = await env.federation.records(env.tenant, action_prefix="key.quota_exhausted")
    assert [r.subject for r in refusals] == [key_id]
    assert env.backends[0].started + env.backends[1].started == 0


async def test_no_healthy_node_is_503(env: Env) -> None:
    for node in env.nodes:
        await node.kill()
    await env.server.state.router.refresh()
    async with env.client() as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert caught.value.status_code == 503
    assert f"no healthy inference node serves model {MODEL}" in caught.value.message


async def test_unknown_routes_and_methods_are_json_errors(env: Env) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(env.base + "/v2/nothing") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "not_found_error"
        async with http.get(env.base + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert "error" in await resp.json()
            assert resp.headers["Allow"] == "POST"


# ---- failures in flight -----------------------------------------------------------------------

async def test_node_killed_mid_stream(env: Env) -> None:
    for backend in env.backends:
        backend.token_delay = 0.05
    async with env.client() as doomed_client, env.client() as other_client:
        stream = await doomed_client.chat.completions.create(
            model=MODEL, messages=user("w " * 40), stream=True)
        iterator = stream.__aiter__()
        await anext(iterator)  # role chunk
        await anext(iterator)  # first token: the stream is live on one node
        victim = next(n for n in env.nodes if n.backend.in_flight)
        survivor = asyncio.create_task(other_client.chat.completions.create(
            model=MODEL, messages=user("still standing")))
        await asyncio.sleep(0.1)
        await victim.kill()
        with pytest.raises(openai.APIError) as caught:
            async for _ in iterator:
                pass
        assert "inference node" in caught.value.message
        completion = await survivor
    assert completion.choices[0].message.content == "still standing"


async def _cancelled_after_disconnect(env: Env, stream: bool) -> None:
    for backend in env.backends:
        backend.token_delay = 0.05
    body = {"model": MODEL, "messages": user("z " * 100), "stream": stream}
    async with aiohttp.ClientSession() as http:
        request = http.post(env.base + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {env.key}"})
        if stream:
            async with request as response:
                await response.content.readline()
        else:
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.3):
                    await request
    await eventually(lambda: not sum(b.in_flight for b in env.backends))
    assert sum(b.cancelled for b in env.backends) == 1
    assert sum(b.completed for b in env.backends) == 0


async def test_client_disconnect_stops_streaming_generation(env: Env) -> None:
    await _cancelled_after_disconnect(env, stream=True)


async def test_client_disconnect_stops_non_streaming_generation(env: Env) -> None:
    await _cancelled_after_disconnect(env, stream=False)


# ---- structured output -------------------------------------------------------------------------

class _Step(BaseModel):
    explanation: str
    output: str


class _MathReasoning(BaseModel):
    steps: list[_Step]
    final_answer: str


async def test_json_schema_with_defs_reaches_the_backend_unchanged(env: Env) -> None:
    """A pydantic schema (``$defs``/``$ref``, arrays of objects) arrives at the backend as
    the same document, so the backend's grammar sees every definition."""
    schema = _MathReasoning.model_json_schema()
    assert "$defs" in schema
    async with env.client() as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "solve 8x + 7 = -23"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "math_reasoning", "schema": schema,
                                             "strict": True}})
    assert json.loads(completion.choices[0].message.content or "")  # JSON text came back
    received = [r for b in env.backends for r in b.requests]
    assert len(received) == 1
    fmt = received[0].response_format
    assert (fmt.type, fmt.schema_name) == ("json_schema", "math_reasoning")
    assert json.loads(fmt.json_schema) == schema
    assert list(json.loads(fmt.json_schema)["properties"]) == ["steps", "final_answer"]
