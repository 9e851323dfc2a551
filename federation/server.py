"""A federation gRPC server: mTLS, authz, health, reflection, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from federation.channels import grpc_options
from federation.config import GrpcConfig
from federation.credentials import CertificateExpiry, ReloadingServerCredentials
from federation.denylist import DenyList
from federation.errors import FederationError
from federation.interceptor import FederationServerInterceptor, RpcMetrics
from federation.pki import CertificateFiles, ChainPolicy

log = logging.getLogger(__name__)

S = TypeVar("S")
M = TypeVar("M")


async def until_drained(messages: AsyncIterator[M], draining: asyncio.Event,
                        refusal: Callable[[], FederationError]) -> AsyncIterator[M]:
    """A long-lived stream's messages until the node starts to drain (its
    ``ServiceRegistration.on_drain``): then ``refusal()`` is raised, so the peer reconnects
    (to another node, or this one restarted) at once instead of at the end of the grace."""
    drained = asyncio.create_task(draining.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(messages))
            await asyncio.wait((following, drained), return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                raise refusal()
            try:
                message = following.result()
            except StopAsyncIteration:
                return
            yield message
    finally:
        drained.cancel()


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to host: its full name and how to add it to a server."""

    full_name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    on_drain: Callable[[], None] | None = None
    """Called when the server starts its graceful stop, for services with long-lived
    streams: ending them then (clients reconnect) beats holding the stop for the
    whole grace period and being cancelled at its end."""

    @classmethod
    def of(cls, full_name: str, add_servicer: Callable[[S, grpc.aio.Server], None],
           servicer: S, *, on_drain: Callable[[], None] | None = None
           ) -> ServiceRegistration:
        """``servicer``, added by its generated ``add_…Servicer_to_server`` function."""
        return cls(full_name, functools.partial(add_servicer, servicer), on_drain)


class NodeServer:
    """Hosts a set of services on one port with everything a node needs.

    Lifecycle: ``await start()``, then ``await stop()``; ``stop`` first marks
    every service NOT_SERVING and tells services to end their long-lived streams,
    then refuses new calls and lets in-flight ones finish within the grace period.
    """

    def __init__(
        self,
        services: Sequence[ServiceRegistration],
        *,
        trust_domain: str,
        grpc_config: GrpcConfig,
        listen: str,
        credentials: CertificateFiles | None,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        registry: CollectorRegistry | None = None,
        enrollment_listen: str | None = None,
        deny_list: DenyList | None = None,
    ) -> None:
        """``credentials=None`` serves plaintext: only for ``--insecure-dev``.

        ``enrollment_listen``: a second TLS port that does not require a client
        certificate (the broker's, for Enroll); ignored without credentials.
        """
        self._services = list(services)
        self._trust_domain = trust_domain
        self._config = grpc_config
        self._listen = listen
        self._credentials = credentials
        self._metrics_host = metrics_host
        self._metrics_port = metrics_port
        self.registry = registry or CollectorRegistry()
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._enrollment_listen = enrollment_listen
        self._deny_list = deny_list
        self.expiry = CertificateExpiry(self.registry)
        self.credentials: list[ReloadingServerCredentials] = []
        """One per TLS port; each follows the certificate files on disk."""
        self.port = 0
        self.metrics_port = 0
        self.enrollment_port = 0

    async def start(self) -> None:
        policy = (ChainPolicy.load(self._credentials.pki_directory)
                  if self._credentials is not None else None)
        interceptor = FederationServerInterceptor(
            self._trust_domain, RpcMetrics(self.registry), insecure_dev=self._credentials is None,
            policy=policy, deny_list=self._deny_list,
        )
        server = grpc.aio.server(interceptors=[interceptor], options=grpc_options(self._config))
        for service in self._services:
            service.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.full_name for s in self._services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        try:
            if self._credentials is None:
                self.port = server.add_insecure_port(self._listen)
            else:
                self.port = server.add_secure_port(self._listen,
                                                   self._tls(require_client_auth=True))
        except RuntimeError as exc:
            # A host that does not resolve or is not ours (nodes.host, --listen): gRPC
            # raises a bare RuntimeError, which would end the node in a traceback.
            raise OSError(f"could not listen on {self._listen}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"could not listen on {self._listen}")
        if self._enrollment_listen is not None and self._credentials is not None:
            anonymous = self._tls(require_client_auth=False)
            self.enrollment_port = server.add_secure_port(self._enrollment_listen, anonymous)
            if self.enrollment_port == 0:
                raise OSError(f"could not listen on {self._enrollment_listen}")
        await server.start()
        self._server = server
        await self.set_serving(True)
        if self._metrics_port is not None:
            await self._start_metrics()
        log.info(
            "serving",
            extra={
                "listen": self._listen,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "services": ",".join(names),
                "tls": self._credentials is not None,
            },
        )

    def _tls(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        assert self._credentials is not None
        reloading = ReloadingServerCredentials(
            self._credentials, require_client_auth=require_client_auth, expiry=self.expiry)
        self.credentials.append(reloading)
        return reloading.credentials

    async def set_serving(self, serving: bool) -> None:
        """Report every hosted service (and the server as a whole) as SERVING or
        NOT_SERVING on gRPC health, e.g. while a dependency is unreachable."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *(s.full_name for s in self._services)):
            await self.health.set(name, status)

    async def _start_metrics(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._metrics_host, self._metrics_port)
        await site.start()
        self._metrics_runner = runner
        self.metrics_port = int(runner.addresses[0][1])

    async def stop(self, grace: float | None = None) -> None:
        grace = self._config.grace_seconds if grace is None else grace
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            log.info("stopping", extra={"grace_seconds": grace})
            for service in self._services:
                if service.on_drain is not None:
                    service.on_drain()
            await self._server.stop(grace)
            self._server = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
