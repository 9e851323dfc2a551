"""The whole path with the real key authority and thermal memory nodes (real PostgreSQL),
real mTLS inference nodes, and the gateway driven by the openai SDK."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from google.protobuf.duration_pb2 import Duration

from federation.config import PeersConfig, Settings
from federation.db import Database
from federation.inference.test_backend import TestBackend
from federation.server import NodeServer
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import key_authority_pb2_grpc as kgrpc
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from gateway_http.app import GatewayServer
from nodes import keys as keys_node
from nodes import memory as memory_node
from tests.gateway_support import gateway_settings, inference_nodes, quiesce
from tests.nodes_support import node
from tests.support import TestPKI

MODEL = "test-model"
TOKEN_QUOTA = 10_000


@dataclass
class Stack:
    pki: TestPKI
    gateway: GatewayServer
    keys: kgrpc.KeyAuthorityServiceAsyncStub
    memory: mgrpc.ThermalMemoryServiceAsyncStub
    backend: TestBackend
    memory_node: NodeServer

    def client(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.gateway.port}/v1",
                                  api_key=key, max_retries=0)

    async def issue(self, tenant: str, scopes: list[str], **limits: object) -> kpb.IssueKeyResponse:
        return await self.keys.IssueKey(kpb.IssueKeyRequest(tenant_id=tenant, scopes=scopes,
                                                            **limits))  # type: ignore[arg-type]


@pytest.fixture
async def stack(tmp_path: Path, database: Database) -> AsyncIterator[Stack]:
    pki = TestPKI(tmp_path / "home")
    backend = TestBackend()
    async with contextlib.AsyncExitStack() as stack:
        memory = await stack.enter_async_context(
            node(pki, "memory", Settings(), database, memory_node))
        memory_address = f"127.0.0.1:{memory.port}"
        keys = await stack.enter_async_context(node(
            pki, "keys", Settings(peers=PeersConfig(memory=memory_address)), database,
            keys_node))
        nodes = await stack.enter_async_context(inference_nodes(pki, [backend]))
        settings = gateway_settings(pki.home, [nodes[0].address])
        settings = dataclasses.replace(settings, peers=dataclasses.replace(
            settings.peers, keys=f"127.0.0.1:{keys.port}", memory=memory_address))
        gateway = GatewayServer(settings, pki.identity("gateway"))  # real gRPC clients
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        admin_keys = pki.channel(f"127.0.0.1:{keys.port}", "admin")
        admin_memory = pki.channel(memory_address, "admin")
        stack.push_async_callback(admin_keys.close, None)
        stack.push_async_callback(admin_memory.close, None)
        yield Stack(pki, gateway, kgrpc.KeyAuthorityServiceStub(admin_keys),
                    mgrpc.ThermalMemoryServiceStub(admin_memory), backend, memory)


async def test_chat_is_authorised_charged_and_audited(stack: Stack) -> None:
    issued = await stack.issue("tenant_a", ["chat"], token_quota=TOKEN_QUOTA,
                               quota_period=Duration(seconds=3600))
    async with stack.client(issued.secret) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "secret plans here"}],
            extra_headers={"x-request-id": "rid-integration-1"})
        completion = raw.parse()
        request_id = raw.headers["x-request-id"]  # the gateway's own id
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "and streamed"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    assert completion.choices[0].message.content == "secret plans here"
    assert chunks[-1].usage is not None
    await quiesce(stack.gateway)

    found = await stack.memory.SearchMemory(mpb.SearchMemoryRequest(
        tenant_id="tenant_a", request_id=request_id))
    (record,) = [r for r in found.records if r.action == "gateway.request"]
    attributes = dict(record.payload.attributes)
    assert (record.actor, record.subject, record.request_id) == (
        issued.key.key_id, MODEL, request_id)
    assert (attributes["status"], attributes["total_tokens"]) == ("200", "7")
    # The record's whole shape: what the gateway writes, and the memory node's name for
    # the writer (the gateway's certificate).
    assert sorted(attributes) == sorted([
        "request_id", "key_id", "route", "model", "status", "latency_ms", "prompt_tokens",
        "completion_tokens", "total_tokens", "stream", "finish_reason", "error_code",
        "client_request_id", "recorded_by"])
    assert attributes["recorded_by"].endswith("/gateway")  # spiffe://…/node/<name>/<role>
    assert {k: attributes[k] for k in ("request_id", "key_id", "route", "model", "stream",
                                       "finish_reason", "error_code",
                                       "client_request_id")} == {
        "request_id": request_id, "key_id": issued.key.key_id,
        "route": "/v1/chat/completions", "model": MODEL, "stream": "false",
        "finish_reason": "stop", "error_code": "", "client_request_id": "rid-integration-1"}
    assert (record.tenant_id, record.payload.body) == ("tenant_a", b"")
    assert "secret plans" not in str(record)  # no prompt or completion text
    assert stack.backend.request_ids[0] == request_id

    charged = completion.usage.total_tokens + chunks[-1].usage.total_tokens  # type: ignore[union-attr]
    quota = await stack.keys.CheckQuota(kpb.CheckQuotaRequest(key_id=issued.key.key_id))
    assert quota.status.tokens_remaining == TOKEN_QUOTA - charged


async def test_real_key_authority_refusals(stack: Stack) -> None:
    messages = [{"role": "user", "content": "hi"}]
    async with stack.client("fed_not_a_real_key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    reader = await stack.issue("tenant_b", ["memory:read"])
    async with stack.client(reader.secret) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    limited = await stack.issue("tenant_b", ["chat"], requests_per_minute=1)
    async with stack.client(limited.secret) as client:
        await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 60


async def test_no_answer_leaves_unaudited(stack: Stack) -> None:
    """The audit record is durable before the answer arrives; without thermal memory
    there is no answer: 503, or an error event before [DONE] on a stream."""
    issued = await stack.issue("tenant_c", ["chat"])
    messages = [{"role": "user", "content": "hello there"}]
    async with stack.client(issued.secret) as client:
        answered = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages)  # type: ignore[arg-type]
        streamed = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, stream=True)  # type: ignore[arg-type]
        assert [c async for c in streamed.parse()]
        for request_id in (answered.headers["x-request-id"],  # no drain() needed
                           streamed.headers["x-request-id"]):
            found = await stack.memory.SearchMemory(mpb.SearchMemoryRequest(
                tenant_id="tenant_c", request_id=request_id))
            assert [r.action for r in found.records] == ["gateway.request"]

        await stack.memory_node.stop(0)
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model=MODEL, messages=messages)  # type: ignore[arg-type]
        assert refused.value.status_code == 503
        assert "audit" in refused.value.message
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError, match="audit"):
            async for _ in stream:
                pass
