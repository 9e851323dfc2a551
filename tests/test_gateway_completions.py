"""``/v1/completions`` (legacy text completions) through the real gateway with the
official ``openai`` SDK: string, list and token prompts, ``n``, streaming, ``echo``,
``suffix``, ``logprobs`` in the legacy shape, on the test backend and through an
``openai`` upstream; quota, audit and errors as on every route."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from tests.db_support import scratch_database
from tests.keys_support import KeyNodes, key_nodes
from tests.openai_env_support import MODEL, UPSTREAM_MODEL, OpenAIEnv, openai_env
from tests.support import TestPKI


@pytest.fixture(scope="module")
async def federation(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[KeyNodes]:
    pki = TestPKI(tmp_path_factory.mktemp("gateway-completions") / "home")
    async with scratch_database(pg_admin_url) as database, key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def env(federation: KeyNodes) -> AsyncIterator[OpenAIEnv]:
    async with openai_env(federation) as running:
        yield running


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
async def test_a_prompt_is_completed(env: OpenAIEnv, model: str) -> None:
    async with env.client() as client:
        raw = await client.completions.with_raw_response.create(
            model=model, prompt="once upon a time", max_tokens=3,
            extra_headers={"x-request-id": f"cmpl-{model}"})
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]  # the gateway's own, not the one sent
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    (choice,) = completion.choices
    assert (choice.text, choice.finish_reason, choice.index) == ("once upon a", "length", 0)
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    await env.settle()
    attributes = dict((await env.record(request_id)).payload.attributes)
    assert attributes["client_request_id"] == f"cmpl-{model}"
    assert (attributes["route"], attributes["status"], attributes["completion_tokens"]) == (
        "/v1/completions", "200", "3")
    if model == UPSTREAM_MODEL:
        sent = env.upstream.bodies[-1]
        assert (sent["prompt"], sent["max_tokens"], sent["model"]) == (
            "once upon a time", 3, "real-name")


async def test_max_tokens_defaults_to_16(env: OpenAIEnv) -> None:
    async with env.client() as client:
        await client.completions.create(model=MODEL, prompt="x")
    assert env.backend.requests[-1].sampling.max_tokens == 16


async def test_a_null_max_tokens_is_the_default_not_unlimited(env: OpenAIEnv) -> None:
    async with env.client() as client:
        await client.post("/completions", body={"model": MODEL, "prompt": "x",
                                                "max_tokens": None}, cast_to=object)
    assert env.backend.requests[-1].sampling.max_tokens == 16


async def test_choices_of_a_seeded_request_get_consecutive_seeds(env: OpenAIEnv) -> None:
    async with env.client() as client:
        await client.completions.create(model=MODEL, prompt=["a", "b"], n=2, seed=2**63 - 1)
    # Each prompt's choices sample differently (one seed for all would repeat one text);
    # the seed wraps within int64.
    assert sorted((r.prompt.text, r.sampling.seed) for r in env.backend.requests[-4:]
                  if r.prompt is not None) == [
        ("a", -(2**63)), ("a", 2**63 - 1), ("b", -(2**63)), ("b", 2**63 - 1)]


async def test_prompt_lists_and_n_make_choices_in_openais_order(env: OpenAIEnv) -> None:
    async with env.client() as client:
        completion = await client.completions.create(
            model=MODEL, prompt=["alpha beta", "gamma"], n=2, max_tokens=5)
        once = await client.completions.create(
            model=MODEL, prompt=["alpha beta", "gamma"], max_tokens=5)
        tokens = await client.completions.create(model=MODEL, prompt=[[5, 6], [7]])
    assert [(c.index, c.text) for c in completion.choices] == [
        (0, "alpha beta"), (1, "alpha beta"), (2, "gamma"), (3, "gamma")]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    # Each prompt's tokens once, however many choices answer it (OpenAI's count).
    assert once.usage is not None
    assert completion.usage.prompt_tokens == once.usage.prompt_tokens > 0
    assert [c.text for c in tokens.choices] == ["t5 t6", "t7"]


async def test_streaming_with_echo_suffix_and_usage(env: OpenAIEnv) -> None:
    env.backend.token_delay = 0.01
    async with env.client() as client:
        stream = await client.completions.create(
            model=MODEL, prompt="def add(a, b):", suffix="return a + b", echo=True,
            max_tokens=10, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "def add(a, b):return a + b"  # the prompt, then the test backend's fill
    assert env.backend.requests[-1].prompt is not None
    assert env.backend.requests[-1].prompt.suffix == "return a + b"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize("model", [MODEL, UPSTREAM_MODEL])
@pytest.mark.parametrize("stream", [False, True])
async def test_logprobs_in_the_legacy_shape(env: OpenAIEnv, model: str, stream: bool) -> None:
    async with env.client() as client:
        if stream:
            chunks = [c async for c in await client.completions.create(
                model=model, prompt="red green blue", logprobs=2, stream=True)]
            parts = [c.choices[0].logprobs for c in chunks
                     if c.choices and c.choices[0].logprobs]
            tokens = [t for p in parts for t in p.tokens or []]
            offsets = [o for p in parts for o in p.text_offset or []]
            tops = [t for p in parts for t in p.top_logprobs or []]
        else:
            completion = await client.completions.create(model=model, prompt="red green blue",
                                                         logprobs=2)
            logprobs = completion.choices[0].logprobs
            assert logprobs is not None
            tokens, offsets = logprobs.tokens or [], logprobs.text_offset or []
            tops = logprobs.top_logprobs or []
            assert logprobs.token_logprobs == [-0.1, -0.2, -0.3]
    assert tokens == ["red", " green", " blue"]
    if model == MODEL:  # the upstream double does not report offsets
        assert offsets == [0, 3, 9]
    assert [sorted(t) for t in tops] == [["red", "red~1"], [" green", " green~1"],
                                          [" blue", " blue~1"]]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [[1], []]}, "prompt[1]"),
    ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"model": MODEL, "prompt": "x", "n": 17}, "n"),
    ({"model": MODEL, "prompt": ["x"] * 9, "n": 2}, "prompt"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_requests_are_400_naming_the_parameter(
        env: OpenAIEnv, body: dict[str, object], param: str, stream: bool) -> None:
    async with aiohttp.ClientSession() as http, http.post(
        env.base + "/v1/completions", json={**body, "stream": stream},
        headers={"Authorization": f"Bearer {env.key}"},
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_the_chat_scope_is_needed_and_council_models_are_not_text_models(
        env: OpenAIEnv, federation: KeyNodes) -> None:
    embed_only = await federation.issue(env.tenant, ["embeddings"], requests_per_minute=100)
    async with env.client(embed_only.secret) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.completions.create(model=MODEL, prompt="x")
    async with env.client() as client:
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="council", prompt="x")

