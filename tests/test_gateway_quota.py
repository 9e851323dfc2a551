"""Token quotas that hold, end to end: the gateway reserves before generating, the
inference node keeps to the reservation, the gateway settles to what was generated.

The whole federation runs in the test process (``tests/stack_support.py``: real thermal
memory, key authority and guardian over mTLS, real PostgreSQL, a real inference node with
the deterministic ``test`` backend), and clients are the official ``openai`` SDK or raw
HTTP. The test backend counts a prompt as each message's words plus one and echoes the
last user message word by word, so a 40-word message is a request of exactly 81 tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from google.protobuf.duration_pb2 import Duration

from federation.db import Database
from federation.v1 import key_authority_pb2 as kpb
from gateway_http.app import GatewayServer
from tests.gateway_support import eventually, quiesce
from tests.stack_support import MODEL, Stack, federation_stack

pytestmark = pytest.mark.timeout(90)

TENANT = "acme"
PERIOD = 3600
WORDS_81 = " ".join(f"w{i}" for i in range(40))
"""40 words: a prompt of 41 tokens and an echo of 40, 81 in all."""


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


async def issue(stack: Stack, token_quota: int) -> kpb.IssueKeyResponse:
    return await stack.keys.IssueKey(kpb.IssueKeyRequest(
        tenant_id=TENANT, scopes=["chat"], token_quota=token_quota,
        quota_period=Duration(seconds=PERIOD)))


def client(stack: Stack, key: str, base: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=(base or stack.base) + "/v1", api_key=key,
                              max_retries=0)


async def settled(stack: Stack, key_id: str, *gateways: GatewayServer) -> kpb.QuotaStatus:
    """The key's quota once every gateway has settled what it served."""
    await eventually(lambda: stack.backend.in_flight == 0)
    for gateway in gateways or (stack.gateway,):
        await quiesce(gateway)
    return (await stack.keys.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id))).status


# ---- the finding: a quota of 100 served every 81-token request -------------------------------

async def test_a_quota_of_100_serves_exactly_one_81_token_request(stack: Stack) -> None:
    issued = await issue(stack, 100)
    served: list[int] = []
    refusals: list[openai.RateLimitError] = []
    async with client(stack, issued.secret) as openai_client:
        for _ in range(10):
            try:
                completion = await openai_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": WORDS_81}])
            except openai.RateLimitError as refused:
                refusals.append(refused)
                continue
            assert completion.usage is not None
            served.append(completion.usage.total_tokens)
            # Settle before the next request, as a client pausing between requests would.
            await settled(stack, issued.key.key_id)
    assert served == [81] and len(refusals) == 9
    for refused in refusals:
        assert refused.status_code == 429
        assert refused.body == {  # OpenAI's shape, type and code
            "message": refused.body["message"],  # type: ignore[index]
            "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}
        retry_after = int(refused.response.headers["Retry-After"])
        assert PERIOD - 60 <= retry_after <= PERIOD  # until the period resets
    status = await settled(stack, issued.key.key_id)
    assert (status.tokens_used, status.tokens_remaining) == (81, 19)


async def test_a_quota_of_50_serves_nothing_and_a_request_within_it_is_capped(
    stack: Stack
) -> None:
    issued = await issue(stack, 50)
    async with client(stack, issued.secret) as openai_client:
        with pytest.raises(openai.RateLimitError) as refused:  # a prompt of 61 tokens
            await openai_client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "y " * 60}])
        assert refused.value.body["code"] == "insufficient_quota"  # type: ignore[index]
        # The node refused the prompt; the gateway releases the reservation after the
        # response (a request arriving sooner finds the tokens held: retry in 1 s).
        assert (await settled(stack, issued.key.key_id)).tokens_used == 0
        # A shorter prompt fits, and its completion is cut where the quota ends.
        completion = await openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": WORDS_81}])
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.total_tokens) == (41, 50)
    assert completion.choices[0].finish_reason == "length"
    status = await settled(stack, issued.key.key_id)
    assert (status.tokens_used, status.tokens_remaining) == (50, 0)


# ---- concurrency: two gateways, one key authority, one quota ---------------------------------

@contextlib.asynccontextmanager
async def gateway_process(stack: Stack, log: Path,
                          started: list[asyncio.subprocess.Process] | None = None
                          ) -> AsyncIterator[str]:
    """A ``federation gateway`` process wired to the stack's nodes; its base URL (the
    process is appended to ``started``, for a test that kills it)."""
    stack.pki.identity("gateway", "local")  # the name the process looks for
    ready = log.with_suffix(".json")
    peers = stack.settings.peers
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")} | {
        "FEDERATION_HOME": str(stack.pki.home),
        "FEDERATION_DATABASE_URL": stack.settings.database.url,
        **{f"FEDERATION_PEERS_{role.upper()}": getattr(peers, role)
           for role in ("keys", "memory", "guardian", "inference")},
        # The inference node runs in this test's busy process: a 2 s health probe at
        # start can time out on a loaded 2-core machine, and the router then answers
        # 503 until its next refresh.
        "FEDERATION_GATEWAY_HEALTH_TIMEOUT_SECONDS": "10",
    }
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "gateway", "--http-port", "0",
            "--ready-file", str(ready), env=env, stdout=output, stderr=output)
    if started is not None:
        started.append(process)
    try:
        await eventually(lambda: ready.exists() or process.returncode is not None, 60)
        assert process.returncode is None, log.read_text()
        base = f"http://127.0.0.1:{json.loads(ready.read_text())['http_port']}"
        await until_healthy(base, 60)
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def until_healthy(base: str, seconds: float) -> None:
    """Wait until the gateway's /health is 200, as a load balancer's readiness probe would:
    listening is not serving (its first probe of the inference node may time out on a
    loaded machine, and then it knows no healthy node until its next refresh)."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(seconds):
        while True:
            async with session.get(f"{base}/health") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.2)


async def test_fifty_concurrent_requests_through_two_gateway_processes_never_exceed_the_quota(
    stack: Stack, tmp_path: Path
) -> None:
    quota = 500
    issued = await issue(stack, quota)
    stack.backend.token_delay = 0.005  # requests overlap
    words = " ".join(f"x{i}" for i in range(10))  # 11 + 10 = 21 tokens each

    async def one(base: str) -> int:
        async with client(stack, issued.secret, base) as openai_client:
            try:
                completion = await openai_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=10)
            except openai.RateLimitError as refused:
                assert refused.body["code"] == "insufficient_quota"  # type: ignore[index]
                return 0
        assert completion.usage is not None
        return completion.usage.total_tokens

    async with gateway_process(stack, tmp_path / "gw1.log") as first, \
            gateway_process(stack, tmp_path / "gw2.log") as second:
        served = await asyncio.gather(*(one((first, second)[i % 2]) for i in range(50)))
        assert sum(served) <= quota
        assert sum(1 for s in served if s) >= 3  # both gateways served while the quota lasted

        async def charged() -> int:  # the processes settle after answering
            status = await stack.keys.CheckQuota(kpb.CheckQuotaRequest(
                key_id=issued.key.key_id))
            return status.status.tokens_used

        async with asyncio.timeout(30):
            while await charged() != sum(served):  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.1)


# ---- streams cut short are charged for what was generated ------------------------------------

async def sse_chat(stack: Stack, key: str, *, stop_after_chunks: int | None = None
                   ) -> list[dict[str, Any]]:
    """Stream an 81-token chat; with ``stop_after_chunks``, hang up after that many content
    chunks."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": WORDS_81}]}
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.post(
            stack.base + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 200
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            events.append(json.loads(line[len(b"data: "):]))
            content = [e for e in events if e.get("choices") and e["choices"][0]["delta"].get(
                "content")]
            if stop_after_chunks is not None and len(content) >= stop_after_chunks:
                response.close()  # the client hangs up mid-stream
                break
    return events


async def test_a_stream_cut_by_the_client_is_charged_for_what_was_generated(
    stack: Stack
) -> None:
    issued = await issue(stack, 1000)
    stack.backend.token_delay = 0.05
    await sse_chat(stack, issued.secret, stop_after_chunks=3)
    status = await settled(stack, issued.key.key_id)
    assert stack.backend.cancelled == 1  # the generation was stopped, not finished
    generated = status.tokens_used - 41
    assert 3 <= generated < 40, status  # the prompt and the tokens sent, not 0 nor all 1000
    # The request's audit record says the same.
    (record,) = await stack.records(TENANT, "gateway.request")
    attributes = dict(record.payload.attributes)
    assert (attributes["status"], attributes["prompt_tokens"]) == ("499", "41")
    assert int(attributes["completion_tokens"]) == generated


async def test_a_stream_cut_by_a_node_failure_is_charged_for_what_was_generated(
    stack: Stack
) -> None:
    issued = await issue(stack, 1000)
    stack.backend.fail_after_tokens = 5
    events = await sse_chat(stack, issued.secret)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events
                   if e.get("choices"))
    assert text == " ".join(WORDS_81.split()[:5])
    assert events[-1]["error"]["code"] == "unavailable"
    status = await settled(stack, issued.key.key_id)
    assert status.tokens_used == 41 + 5


async def test_a_client_leaving_before_the_first_token_is_charged_the_prompt_bound(
    stack: Stack
) -> None:
    """Nothing arrived, so the node's prompt count is unknown: the gateway's upper bound
    of the prompt is charged (never more than the reservation)."""
    issued = await issue(stack, 100_000)
    stack.backend.first_token_delay = 5.0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}]}
    with contextlib.suppress(TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
            await http.post(stack.base + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {issued.secret}"})
    await eventually(lambda: stack.backend.cancelled == 1)
    status = await settled(stack, issued.key.key_id)
    assert 0 < status.tokens_used < 200  # the bound of a 5-byte prompt, not the reservation


# ---- the key authority's settlement over gRPC -------------------------------------------------

async def test_settling_over_grpc_is_idempotent(stack: Stack) -> None:
    issued = await issue(stack, 1000)
    key_id = issued.key.key_id
    reserved = await stack.keys.ReserveQuota(kpb.ReserveQuotaRequest(
        key_id=key_id, tokens=5000, min_tokens=10))
    assert (reserved.reserved_tokens, reserved.token_budget) == (1000, 1000)
    assert reserved.status.tokens_remaining == 0
    settle = kpb.SettleQuotaRequest(key_id=key_id, reservation_id=reserved.reservation_id,
                                    used_tokens=300)
    first, second = await stack.keys.SettleQuota(settle), await stack.keys.SettleQuota(settle)
    assert (first.settled, first.released_tokens) == (True, 700)
    assert (second.settled, second.released_tokens) == (False, 0)
    status = (await stack.keys.CheckQuota(kpb.CheckQuotaRequest(key_id=key_id))).status
    assert status.tokens_used == 300


async def test_a_quota_larger_than_any_budget_still_serves(stack: Stack) -> None:
    """Budgets travel as uint32; a bigger quota is simply no limit on one generation."""
    issued = await issue(stack, 10**12)
    async with client(stack, issued.secret) as openai_client:
        completion = await openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": WORDS_81}],
            max_tokens=2**32 - 1)
    assert completion.usage is not None and completion.usage.total_tokens == 81
    assert stack.backend.requests[-1].token_budget == 2**32 - 1
    status = await settled(stack, issued.key.key_id)
    assert status.tokens_used == 81
