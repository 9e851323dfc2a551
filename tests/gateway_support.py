"""Helpers for the inference and gateway tests: real mTLS inference nodes on loopback.

The key authority and thermal memory the gateway needs: ``tests/keys_support.py``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from federation.config import GrpcConfig, PeersConfig, Settings
from federation.inference.backend import BackendSet
from federation.inference.test_backend import TestBackend
from federation.server import NodeServer
from gateway_http.app import GatewayServer
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


async def quiesce(gateway: GatewayServer) -> None:
    """Wait until every request the gateway took has ended, its after-work (audit
    records, quota settlements) spooled and delivered: a streamed answer reaches the
    client before its settlement is spooled. The gateway's quota leases are ended too, so
    that the key's counters show what its requests used, not what a lease holds."""
    await eventually(lambda: gateway.state.in_progress == 0)
    if gateway.state.leases is not None:
        await gateway.state.leases.end_all()
    await gateway.state.background.drain()
    assert await gateway.state.outbox.drain(), "the outbox did not drain"
