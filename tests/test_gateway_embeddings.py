"""``/v1/embeddings`` through the real gateway with the official ``openai`` SDK: the test
backend and an ``openai`` upstream; float and base64 (little-endian float32); token-array
inputs; dimensions; the embeddings scope; quota charged to the node's count; the audit
record written before the answer; errors naming the parameter."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from federation.inference.test_backend import DIMENSIONS, embedding_vector
from tests.db_support import scratch_database
from tests.keys_support import KeyNodes, key_nodes
from tests.openai_env_support import MODEL, UPSTREAM_MODEL, OpenAIEnv, openai_env
from tests.support import TestPKI


@pytest.fixture(scope="module")
async def federation(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KeyNodes]:
    pki = TestPKI(tmp_path_factory.mktemp("gateway-embeddings") / "home")
    async with scratch_database(pg_admin_url) as database, key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def env(federation: KeyNodes) -> AsyncIterator[OpenAIEnv]:
    async with openai_env(federation) as running:
        yield running


@pytest.mark.parametrize("encoding", ["sdk-default", "float", "base64"])
async def test_each_input_gets_its_vector(env: OpenAIEnv, encoding: str) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    options = {} if encoding == "sdk-default" else {"encoding_format": encoding}
    async with env.client() as client:
        raw = await client.embeddings.with_raw_response.create(
            model=MODEL, input=["hello world", "the cat sat"], **options)  # type: ignore[arg-type]
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    vector = result.data[0].embedding
    if encoding == "base64":
        raw_bytes = base64.b64decode(vector)  # type: ignore[arg-type]
        vector = list(struct.unpack(f"<{len(raw_bytes) // 4}f", raw_bytes))
    assert vector == pytest.approx(embedding_vector("hello world", DIMENSIONS), rel=1e-6)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (7, 7)
    await env.settle()
    attributes = dict((await env.record(raw.headers["x-request-id"])).payload.attributes)
    assert (attributes["route"], attributes["status"], attributes["prompt_tokens"]) == (
        "/v1/embeddings", "200", "7")
    assert await env.tokens_used() == 7


async def test_base64_is_little_endian_float32(env: OpenAIEnv) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        env.base + "/v1/embeddings", headers={"Authorization": f"Bearer {env.key}"},
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64"},
    ) as response:
        body = await response.json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert values == pytest.approx(embedding_vector("hello world", DIMENSIONS), rel=1e-6)


async def test_token_arrays_and_dimensions(env: OpenAIEnv) -> None:
    async with env.client() as client:
        result = await client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4]],
                                                dimensions=5)
        single = await client.embeddings.create(model=MODEL, input=[7, 8])
    assert [len(d.embedding) for d in result.data] == [5, 5]
    assert env.backend.embed_requests[-2].inputs == ((1, 2, 3), (4,))
    assert env.backend.embed_requests[-1].inputs == ((7, 8),)
    assert len(single.data) == 1


async def test_an_upstream_embeds_and_its_count_is_charged(env: OpenAIEnv) -> None:
    async with env.client() as client:
        result = await client.embeddings.create(model=UPSTREAM_MODEL, input=["a", "b"],
                                                dimensions=4)
    assert [len(d.embedding) for d in result.data] == [4, 4]
    assert result.usage.prompt_tokens == 6  # the upstream's own count
    sent = env.upstream.bodies[-1]
    assert (sent["model"], sent["input"], sent["dimensions"]) == ("real-name", ["a", "b"], 4)
    await env.settle()
    assert await env.tokens_used() == 6


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL, "input": ""}, "input"),
    ({"model": MODEL, "input": []}, "input"),
    ({"model": MODEL, "input": ["ok", ""]}, "input[1]"),
    ({"model": MODEL, "input": [[1], [-1]]}, "input[1]"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": MODEL}, "input"),
    ({"input": "x"}, "model"),
])
async def test_bad_requests_are_400_naming_the_parameter(env: OpenAIEnv, body: dict[str, object],
                                                         param: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        env.base + "/v1/embeddings", json=body,
        headers={"Authorization": f"Bearer {env.key}"},
    ) as response:
        error = (await response.json())["error"]
        assert response.status == 400 and response.headers["x-request-id"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_the_embeddings_scope_is_needed(env: OpenAIEnv, federation: KeyNodes) -> None:
    chat_only = await federation.issue(env.tenant, ["chat"], requests_per_minute=100)
    async with env.client(chat_only.secret) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.embeddings.create(model=MODEL, input="x")
        with pytest.raises(openai.NotFoundError):
            await env.client().embeddings.create(model="nope", input="x")


async def test_a_quota_too_small_for_the_input_is_429(federation: KeyNodes) -> None:
    async with openai_env(federation, token_quota=3) as small, small.client() as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.embeddings.create(model=MODEL, input="one two three four five")
        assert caught.value.code == "insufficient_quota"
        await small.settle()
        assert await small.tokens_used() == 0


async def test_requests_are_counted_in_the_metrics(env: OpenAIEnv) -> None:
    async with env.client() as client:
        await client.embeddings.create(model=MODEL, input="a b c")
        await client.completions.create(model=MODEL, prompt="a b c")
    async with aiohttp.ClientSession() as http, http.get(env.base + "/metrics") as response:
        metrics = await response.text()
    for route in ("/v1/embeddings", "/v1/completions"):
        assert (f'federation_gateway_requests_total{{model="{MODEL}",route="{route}",'
                f'status="200"}} 1.0') in metrics
    assert f'federation_gateway_tokens_total{{kind="prompt",model="{MODEL}"}}' in metrics
