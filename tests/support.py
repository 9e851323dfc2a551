"""Helpers for tests: an in-test federation CA and real mTLS servers on port 0."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from federation.channels import secure_channel
from federation.config import GrpcConfig
from federation.pki import CertificateAuthority, CertificateFiles
from federation.server import NodeServer, ServiceRegistration

TRUST_DOMAIN = "federation.local"


class TestPKI:
    """A federation CA under a temporary home, issuing identities on demand."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, home: Path, trust_domain: str = TRUST_DOMAIN) -> None:
        self.home = home
        self.ca = CertificateAuthority.init(home, trust_domain)
        self._issued: dict[tuple[str, str], CertificateFiles] = {}

    def identity(self, role: str, name: str = "test") -> CertificateFiles:
        key = (role, name)
        if key not in self._issued:
            self._issued[key] = self.ca.issue(role, name)
        return self._issued[key]

    def channel(self, target: str, role: str, name: str = "test") -> grpc.aio.Channel:
        return secure_channel(target, self.identity(role, name), GrpcConfig())


@contextlib.asynccontextmanager
async def serving(
    pki: TestPKI,
    services: Sequence[ServiceRegistration],
    *,
    role: str,
    grpc_config: GrpcConfig | None = None,
) -> AsyncIterator[NodeServer]:
    """A started mTLS :class:`NodeServer` on 127.0.0.1:0 hosting ``services`` as ``role``."""
    server = NodeServer(
        services,
        trust_domain=pki.ca.trust_domain,
        grpc_config=grpc_config or GrpcConfig(grace_seconds=1),
        listen="127.0.0.1:0",
        credentials=pki.identity(role, "server"),
        metrics_port=0,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)
