"""Helpers for the inference and gateway tests: real mTLS inference nodes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from federation.config import GrpcConfig, PeersConfig, Settings
from federation.errors import ErrorCode, FederationError
from federation.inference.backend import BackendSet
from federation.inference.test_backend import TestBackend
from federation.server import NodeServer
from gateway_http.auth import AuditEntry, KeyPrincipal
from nodes.inference import InferenceServicer, registration
from tests.support import TestPKI


@dataclass
class InferenceNode:
    server: NodeServer
    backend: TestBackend

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    async def kill(self) -> None:
        """Stop at once: in-flight calls are cut, as when the process dies."""
        await self.server.stop(0)


async def start_inference_node(pki: TestPKI, backend: TestBackend, name: str) -> InferenceNode:
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([backend])))],
        trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(grace_seconds=0.5),
        listen="127.0.0.1:0",
        credentials=pki.identity("inference", name),
        metrics_port=None,
    )
    await server.start()
    return InferenceNode(server, backend)


@contextlib.asynccontextmanager
async def inference_nodes(pki: TestPKI, backends: Sequence[TestBackend]
                          ) -> AsyncIterator[list[InferenceNode]]:
    nodes: list[InferenceNode] = []
    try:
        for i, backend in enumerate(backends):
            nodes.append(await start_inference_node(pki, backend, f"inf{i}"))
        yield nodes
    finally:
        for node in nodes:
            await node.kill()


# ---- stand-ins for the key authority and thermal memory (protocol implementations) -------------

class FakeKeys:
    """A KeyVerifier: secrets map to principals; some are suspended or rate limited."""

    def __init__(self) -> None:
        self.principals: dict[str, KeyPrincipal] = {}
        self.suspended: set[str] = set()
        self.limited: set[str] = set()
        self.verify_calls = 0
        self.charges: list[tuple[str, int, bool]] = []

    def add(self, secret: str, key_id: str, tenant: str, scopes: Sequence[str] = ("chat",)
            ) -> None:
        self.principals[secret] = KeyPrincipal(key_id, tenant, frozenset(scopes))

    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        self.verify_calls += 1
        principal = self.principals.get(key)
        if principal is None:
            raise FederationError(ErrorCode.UNAUTHENTICATED, "invalid API key")
        if key in self.suspended or (scope and scope not in principal.scopes):
            raise FederationError(ErrorCode.PERMISSION_DENIED, "key may not do this")
        return principal

    async def consume(self, key_id: str, *, tokens: int, is_request: bool) -> None:
        if key_id in self.limited:
            raise FederationError(ErrorCode.RESOURCE_EXHAUSTED, "rate limit exceeded",
                                  retry_after_seconds=30)
        self.charges.append((key_id, tokens, is_request))


class FakeAudit:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def record(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


def gateway_settings(home: Path, inference: Sequence[str], **gateway: object) -> Settings:
    base = Settings(home=home)
    return dataclasses.replace(
        base,
        gateway=dataclasses.replace(base.gateway, http_port=0, **gateway),  # type: ignore[arg-type]
        peers=PeersConfig(inference=",".join(inference)),
    )


async def eventually(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds: it observes another component's counters,
    which offer nothing to await."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
