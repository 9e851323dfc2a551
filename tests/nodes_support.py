"""Real federation nodes in the test process: each role's ``create_service`` on a real
mTLS ``NodeServer``, on a port chosen up front so that nodes which call each other
(memory ↔ guardian) can be configured before either starts, and so that a stopped
node can be started again at the same address."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType

from prometheus_client import CollectorRegistry

from federation.config import GrpcConfig, Settings
from federation.db import Database
from federation.server import NodeServer
from nodes.runtime import NodeRuntime
from tests.support import TestPKI, serving


@contextlib.asynccontextmanager
async def node(pki: TestPKI, role: str, settings: Settings, database: Database,
               module: ModuleType) -> AsyncIterator[NodeServer]:
    """``module.create_service`` as the daemon hosts it, on a started mTLS node at
    127.0.0.1:0 (with a metrics port); stopped at exit."""
    async with contextlib.AsyncExitStack() as cleanup:
        runtime = NodeRuntime(settings, role, pki.identity(role, "server"), database,
                              CollectorRegistry(), cleanup)
        registration = await module.create_service(runtime)
        async with serving(pki, [registration], role=role) as server:
            yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningNode:
    """A node that can be stopped and started again at the same port."""

    pki: TestPKI
    role: str
    settings: Settings
    database: Database
    module: ModuleType
    port: int = field(default_factory=free_port)
    _stack: contextlib.AsyncExitStack | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self._stack is None, "already running"
        stack = contextlib.AsyncExitStack()
        try:
            cleanup = await stack.enter_async_context(contextlib.AsyncExitStack())
            runtime = NodeRuntime(self.settings, self.role, self.pki.identity(self.role, "server"),
                                  self.database, CollectorRegistry(), cleanup)
            registration = await self.module.create_service(runtime)
            server = NodeServer(
                [registration], trust_domain=self.pki.ca.trust_domain,
                grpc_config=GrpcConfig(grace_seconds=0.2), listen=self.address,
                credentials=self.pki.identity(self.role, "server"), metrics_port=None,
            )
            await server.start()
            stack.push_async_callback(server.stop, 0)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()


@contextlib.asynccontextmanager
async def running(*nodes: RunningNode) -> AsyncIterator[None]:
    """Start ``nodes`` in order; stop them in reverse at exit."""
    try:
        for node in nodes:
            await node.start()
        yield
    finally:
        for node in reversed(nodes):
            await node.stop()
