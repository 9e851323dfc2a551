"""The aiohttp application of the OpenAI-compatible gateway, and its process lifecycle.

``create_app`` builds the app; its dependencies (channels to the other nodes,
the inference router, the key verifier and audit writer, background work)
live in one ``cleanup_ctx`` entry and are torn down in reverse order.
``GatewayServer`` hosts the app on an ``AppRunner`` inside an event loop the
caller owns (so it shares the loop with grpc.aio); ``run_gateway`` is the
``federation gateway`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from federation.channels import open_channel
from federation.config import ConfigError, Settings
from federation.credentials import CertificateExpiry
from federation.inference.client import InferenceRouter
from federation.keys.client import GrpcKeyVerifier, KeyVerifier, QuotaLeaser
from federation.keys.lease_book import LeaseBook, LeaseMetrics, LeaseUse, LeasingKeyVerifier
from federation.launch.lifeline import watch_lifeline
from federation.logs import request_id_var
from federation.memory.client import GrpcAuditSink
from federation.memory.sink import AuditSink
from federation.pki import CertificateFiles, certificate_files
from federation.telemetry import tracing
from federation.telemetry.metrics import register_process_metrics
from gateway_http import health, models, openapi
from gateway_http.audit import RequestRecord
from gateway_http.background import BackgroundTasks
from gateway_http.body import body_middleware
from gateway_http.chat import routes as chat_routes
from gateway_http.chat.serving import ChatServing
from gateway_http.completions import routes as completions_routes
from gateway_http.council.routes import add_council_routes
from gateway_http.embeddings import routes as embeddings_routes
from gateway_http.errors import error_middleware
from gateway_http.key_cache import CachedKeyVerifier
from gateway_http.lifecycle import (
    AUDIT_RECORD,
    QUOTA_LEASE_SETTLEMENT,
    QUOTA_SETTLEMENT,
    lifecycle_middleware,
    settle_from_outbox,
    settle_lease_from_outbox,
    stamp_headers,
)
from gateway_http.metrics import GatewayMetrics, metrics_handler
from gateway_http.outbox import Outbox, OutboxConfig, OutboxMetrics
from gateway_http.request_rate import RequestRate
from gateway_http.server import EdgeLimits, EdgeRunner, EdgeServer, fit_connection_limit
from gateway_http.state import PRINCIPAL, STATE, GatewayState
from gateway_http.tls import HttpsContext, https_files, warn_if_plain_off_loopback
from gateway_http.tracing import tracing_middleware
from gateway_http.transcripts import transcript_middleware
from gateway_http.vault import add_vault_routes

log = logging.getLogger(__name__)

PEER_ROLES = ("keys", "memory", "guardian", "council", "broker")


def create_app(
    settings: Settings,
    credentials: CertificateFiles | None,
    *,
    keys: KeyVerifier | None = None,
    audit: AuditSink | None = None,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """The gateway app. ``keys``/``audit`` replace the gRPC clients (tests, benchmarks);
    ``credentials=None`` talks plaintext to nodes started with ``--insecure-dev``."""
    app = web.Application(
        client_max_size=settings.gateway.max_body_bytes,
        # The body is read and parsed (depth and number ranges checked) inside the
        # error guard and before the transcript middleware, which create_app appends
        # after it.
        middlewares=[tracing_middleware, lifecycle_middleware, error_middleware,
                     body_middleware(settings.gateway)],
    )
    registry = registry or CollectorRegistry()
    register_process_metrics(registry, settings, "gateway")
    app.cleanup_ctx.append(_dependencies(settings, credentials, keys, audit, registry))
    app.on_response_prepare.append(stamp_headers)
    chat_routes.add_routes(app)
    completions_routes.add_routes(app)
    embeddings_routes.add_routes(app)
    models.add_routes(app)
    health.add_routes(app)
    openapi.add_routes(app)
    app.router.add_get("/metrics", metrics_handler(registry))
    if vault_enabled(settings):
        add_vault_routes(app, settings, credentials)
        app.middlewares.append(transcript_middleware(PRINCIPAL))
    if settings.peers.council:
        add_council_routes(app)
    return app


def vault_enabled(settings: Settings) -> bool:
    """The vault and tenant transcripts need PostgreSQL and a guardian; a gateway
    configured without them serves the OpenAI API alone (and no tenant can have opted
    in to transcripts, which live in that database)."""
    return bool(settings.database.url and settings.peers.addresses("guardian"))


def _dependencies(
    settings: Settings,
    credentials: CertificateFiles | None,
    keys: KeyVerifier | None,
    audit: AuditSink | None,
    registry: CollectorRegistry,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            channels: dict[str, grpc.aio.Channel] = {}
            for role in PEER_ROLES:
                addresses = settings.peers.addresses(role)
                if addresses:
                    channels[role] = open_channel(addresses[0], credentials, settings.grpc)
                    stack.push_async_callback(channels[role].close, None)
            gateway = settings.gateway
            timeout = settings.grpc.call_timeout_seconds
            router = InferenceRouter(
                settings.peers.addresses("inference"), credentials, settings.grpc,
                refresh_seconds=gateway.route_refresh_seconds,
                probe_timeout_seconds=gateway.health_timeout_seconds,
                attempts=gateway.route_attempts,
                first_event_timeout_seconds=gateway.route_first_event_timeout_seconds,
                probe_timeouts_to_down=gateway.route_probe_timeouts_to_down,
            )
            stack.push_async_callback(router.stop)
            await router.start()
            background = BackgroundTasks()
            stack.push_async_callback(background.drain)  # before the channels close
            metrics = GatewayMetrics(registry)
            writer = audit or _audit_client(settings, channels, stack)
            leaser = None if keys else GrpcKeyVerifier(_required(channels, "keys"), timeout)
            cached = CachedKeyVerifier(
                keys or _required_leaser(leaser), gateway.auth_cache_ttl_seconds,
                gateway.auth_negative_cache_ttl_seconds,
            )
            outbox = _outbox(settings, metrics, writer, cached, leaser)
            await outbox.start()
            stack.push_async_callback(outbox.stop, settings.grpc.grace_seconds)
            leases, verifier = await _leases(settings, leaser, cached, outbox, metrics, stack)
            app[STATE] = GatewayState(
                settings=settings,
                router=router,
                keys=verifier,
                audit=writer,
                metrics=metrics,
                background=background,
                chat=ChatServing(),
                channels=channels,
                outbox=outbox,
                leases=leases,
                request_rate=RequestRate(channels["keys"], timeout) if leaser else None,
            )
            yield

    return context


def _audit_client(settings: Settings, channels: dict[str, grpc.aio.Channel],
                  stack: contextlib.AsyncExitStack) -> GrpcAuditSink:
    """Concurrent requests' audit records share calls to the memory node."""
    client = GrpcAuditSink(_required(channels, "memory"),
                           timeout_seconds=settings.grpc.call_timeout_seconds,
                           max_batch=settings.memory.max_batch)
    stack.push_async_callback(client.close)  # after the outbox stops, before the channel
    return client


async def _leases(settings: Settings, leaser: GrpcKeyVerifier | None, keys: KeyVerifier,
                  outbox: Outbox, metrics: GatewayMetrics, stack: contextlib.AsyncExitStack
                  ) -> tuple[LeaseBook | None, KeyVerifier]:
    """Quota leases over the key authority's client (not over a stand-in); stopped, and
    their settlements spooled, before the outbox stops."""
    if leaser is None or not settings.keys.quota_leases:
        return None, keys

    async def spool(use: LeaseUse) -> None:
        await outbox.put(QUOTA_LEASE_SETTLEMENT, dataclasses.asdict(use))

    book = LeaseBook(leaser, settings.keys, spool, LeaseMetrics(metrics.registry))
    await book.start()
    stack.push_async_callback(book.stop)
    return book, LeasingKeyVerifier(keys, book)


def _outbox(settings: Settings, metrics: GatewayMetrics, audit: AuditSink,
            keys: KeyVerifier, leaser: QuotaLeaser | None) -> Outbox:
    gateway = settings.gateway
    outbox = Outbox(
        OutboxConfig(
            directory=settings.home / gateway.outbox_dir,
            max_records=gateway.outbox_max_records,
            retry_initial_seconds=gateway.outbox_retry_initial_seconds,
            retry_max_seconds=gateway.outbox_retry_max_seconds,
        ),
        OutboxMetrics(metrics.registry),
    )

    async def deliver_audit(payload: Mapping[str, Any]) -> None:
        record = RequestRecord(**payload)
        request_id_var.set(record.request_id)  # its delivery logs under its request's id
        await audit.record(record.audit_entry())

    outbox.register(AUDIT_RECORD, deliver_audit)
    outbox.register(QUOTA_SETTLEMENT, functools.partial(settle_from_outbox, keys))
    if leaser is not None:
        outbox.register(QUOTA_LEASE_SETTLEMENT,
                        functools.partial(settle_lease_from_outbox, leaser))
    return outbox


def _required_leaser(leaser: GrpcKeyVerifier | None) -> GrpcKeyVerifier:
    assert leaser is not None  # built whenever no stand-in verifier is given
    return leaser


def _required(channels: dict[str, grpc.aio.Channel], role: str) -> grpc.aio.Channel:
    if role not in channels:
        raise ConfigError(f"the gateway needs the {role} node: set peers.{role}")
    return channels[role]


class GatewayServer:
    """The gateway app on an :class:`~gateway_http.server.EdgeRunner` (``AppRunner``
    with head/body deadlines and a connection limit) + ``TCPSite``; ``port`` is the
    bound port."""

    def __init__(self, settings: Settings, credentials: CertificateFiles | None, *,
                 keys: KeyVerifier | None = None, audit: AuditSink | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.app = create_app(settings, credentials, keys=keys, audit=audit, registry=registry)
        self._settings = settings
        self._runner: web.AppRunner | None = None
        expiry = CertificateExpiry(registry)
        if credentials is not None:  # the gateway's own identity, presented to every node
            _, chain, ca = credentials.read()
            expiry.record(credentials, chain, ca)
        files = https_files(settings, credentials)
        self.https = (HttpsContext(files, settings.gateway.tls_reload_seconds, expiry)
                      if files is not None else None)
        """The HTTPS context (``gateway.tls``); ``None`` serves plain HTTP."""
        self.port = 0

    @property
    def state(self) -> GatewayState:
        return self.app[STATE]

    @property
    def edge(self) -> EdgeServer:
        """The HTTP server: open connections, refusals over the limit, limits in effect."""
        assert self._runner is not None and isinstance(self._runner.server, EdgeServer)
        return self._runner.server

    async def start(self) -> None:
        config = self._settings.gateway
        runner = EdgeRunner(
            self.app,
            limits=EdgeLimits.from_config(config, fit_connection_limit(config.max_connections)),
            access_log=None,
            # A client that disconnects cancels its handler, which cancels the
            # gRPC call, which stops the generation on the node.
            handler_cancellation=True,
            keepalive_timeout=config.keepalive_timeout_seconds,
            shutdown_timeout=self._settings.grpc.grace_seconds,
        )
        await runner.setup()
        self._runner = runner
        warn_if_plain_off_loopback(self._settings)
        site = web.TCPSite(runner, config.http_host, config.http_port,
                           backlog=config.listen_backlog,
                           ssl_context=self.https.context if self.https else None)
        await site.start()
        if self.https is not None:
            await self.https.start()
        self.port = int(runner.addresses[0][1])
        log.info("gateway serving", extra={"host": self._settings.gateway.http_host,
                                           "port": self.port, "tls": config.tls})

    async def stop(self) -> None:
        if self.https is not None:
            await self.https.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def run_gateway(settings: Settings, *, ready_file: str | None = None,
                      lifeline_fd: int | None = None) -> int:
    """The ``federation gateway`` process: serve until SIGTERM/SIGINT, or until the
    supervisor's lifeline (``federation up``) closes."""
    credentials = certificate_files(settings.home, settings.trust_domain, "gateway",
                                    settings.node_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if lifeline_fd is not None:
        watch_lifeline(lifeline_fd, stop.set,
                       hard_deadline=settings.supervisor.orphan_stop_seconds)
    end_tracing = tracing.configure(settings.tracing, "gateway")
    server = GatewayServer(settings, credentials)
    await server.start()
    try:
        if ready_file:
            _write_ready_file(Path(ready_file), server.port)
        await stop.wait()
        log.info("shutdown requested")
    finally:
        await server.stop()
        end_tracing()
    return 0


def _write_ready_file(path: Path, port: int) -> None:
    info = {"role": "gateway", "pid": os.getpid(), "http_port": port}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
