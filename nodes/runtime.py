"""What a service implementation gets from the daemon hosting it.

Each service module in ``nodes/`` exposes::

    async def create_service(runtime: NodeRuntime) -> ServiceRegistration

It may start background work and must register its teardown on
``runtime.cleanup`` (an ``AsyncExitStack`` unwound in reverse order on stop).
Servicers only translate between protobuf messages and plain domain code;
domain errors are raised as ``FederationError`` and mapped to statuses by the
shared interceptor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry

from federation.channels import open_channel
from federation.config import Settings
from federation.db import Database
from federation.pki import CertificateFiles
from federation.server import NodeServer


@dataclass
class NodeRuntime:
    settings: Settings
    role: str
    credentials: CertificateFiles | None
    """This node's own identity; ``None`` only under ``--insecure-dev``."""
    database: Database | None
    """Started and migrated; ``None`` for roles that need no storage."""
    registry: CollectorRegistry
    cleanup: contextlib.AsyncExitStack
    server: NodeServer | None = None
    """The server hosting the service, once started (set by the daemon)."""
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    async def set_serving(self, serving: bool) -> None:
        """Report the node SERVING or NOT_SERVING on gRPC health (a service that finds
        itself unable to serve, e.g. a wedged inference node)."""
        if self.server is not None:
            await self.server.set_serving(serving)

    def channel(self, target: str) -> grpc.aio.Channel:
        """A shared mTLS channel to ``target`` (``host:port``), closed at stop."""
        if target not in self._channels:
            chan = open_channel(target, self.credentials, self.settings.grpc)
            self._channels[target] = chan
            self.cleanup.push_async_callback(chan.close)
        return self._channels[target]

    def peer_channel(self, role: str) -> grpc.aio.Channel:
        """The channel to the (first) node serving ``role``, per ``settings.peers``."""
        return self.channel(self.settings.peers.address(role))

    def require_database(self) -> Database:
        if self.database is None:
            raise RuntimeError(f"role {self.role} was started without a database")
        return self.database
