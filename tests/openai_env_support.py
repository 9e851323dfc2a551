"""The gateway as ``federation gateway`` builds it, for the OpenAI-surface tests (tools,
logprobs, completions, embeddings): real key authority and thermal memory nodes (real
PostgreSQL, started once per module), a real mTLS inference node per test serving two
models, the deterministic test backend (``test-model``) and an ``openai`` backend in
front of the deterministic OpenAI-compatible upstream (``upstream-model``, see
``tests/openai_upstream.py``). Only the HTTP client is the test: the official ``openai``
SDK."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai

from federation.config import GrpcConfig, ModelConfig
from federation.inference.backend import BackendSet
from federation.inference.openai_upstream import OpenAIUpstreamBackend
from federation.inference.test_backend import TestBackend
from federation.server import NodeServer
from federation.v1 import key_authority_pb2 as kpb
from federation.v1 import thermal_memory_pb2 as mpb
from gateway_http.app import GatewayServer
from nodes.inference import InferenceServicer, registration
from tests.gateway_support import gateway_settings, quiesce
from tests.keys_support import KeyNodes
from tests.openai_upstream import OpenAIUpstream, serving

MODEL = "test-model"
UPSTREAM_MODEL = "upstream-model"
RPM = 10_000
TOKEN_QUOTA = 1_000_000


@dataclass
class OpenAIEnv:
    server: GatewayServer
    federation: KeyNodes
    backend: TestBackend
    upstream: OpenAIUpstream
    tenant: str
    issued: kpb.IssueKeyResponse

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

    async def settle(self) -> None:
        await quiesce(self.server)

    async def record(self, request_id: str) -> mpb.MemoryRecord:
        """The request's one audit record in thermal memory."""
        (record,) = await self.federation.gateway_records(self.tenant, request_id)
        return record

    async def tokens_used(self) -> int:
        return int((await self.federation.quota(self.key_id)).tokens_used)


@contextlib.asynccontextmanager
async def openai_env(federation: KeyNodes, scopes: tuple[str, ...] = ("chat", "embeddings"),
                     token_quota: int = TOKEN_QUOTA) -> AsyncIterator[OpenAIEnv]:
    pki = federation.pki
    tenant = "tenant_" + uuid.uuid4().hex[:8]
    issued = await federation.issue(tenant, list(scopes), requests_per_minute=RPM,
                                    token_quota=token_quota)
    backend = TestBackend()
    upstream = OpenAIUpstream()
    async with serving(upstream) as url:
        proxy = OpenAIUpstreamBackend(ModelConfig(id=UPSTREAM_MODEL, backend="openai",
                                                  base_url=url, upstream_model="real-name"))
        backends = BackendSet([backend, proxy])
        await backends.start()
        node = NodeServer([registration(InferenceServicer(backends))],
                          trust_domain=pki.ca.trust_domain,
                          grpc_config=GrpcConfig(grace_seconds=0.5), listen="127.0.0.1:0",
                          credentials=pki.identity("inference", "inf-openai"),
                          metrics_port=None)
        await node.start()
        settings = federation.wire(gateway_settings(
            pki.home, [f"127.0.0.1:{node.port}"], route_refresh_seconds=60))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        try:
            yield OpenAIEnv(server, federation, backend, upstream, tenant, issued)
        finally:
            await server.stop()
            await node.stop(0)
            await backends.stop()
