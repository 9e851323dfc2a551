"""``federation node --role ROLE``: one role as a grpc.aio daemon.

Start-up: identity → database (for roles that store state) → the role's
service → the gRPC server → the ready file. Shutdown on SIGTERM/SIGINT (or when
the supervisor's lifeline closes, see ``federation.launch.lifeline``) runs the same
steps in reverse: stop accepting, drain in-flight calls within the grace
period, stop background work, close the pool; then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from federation.config import ROLES_WITH_SERVICES, Settings
from federation.db import Database, DatabaseWatch
from federation.denylist import DenyList
from federation.launch.lifeline import watch_lifeline
from federation.pki import PKIError, certificate_files
from federation.server import NodeServer, ServiceRegistration
from federation.telemetry import tracing
from federation.telemetry.metrics import database_up_collector, register_process_metrics
from nodes import council, edge, guardian, inference, keys, memory
from nodes.runtime import NodeRuntime

log = logging.getLogger(__name__)

ServiceFactory = Callable[[NodeRuntime], Awaitable[ServiceRegistration]]

SERVICES: dict[str, ServiceFactory] = {
    "keys": keys.create_service,
    "memory": memory.create_service,
    "guardian": guardian.create_service,
    "inference": inference.create_service,
    "council": council.create_service,
    "broker": edge.create_service,
}
"""The service of each role: ``create_service`` of its module in ``nodes/``."""

ROLES_WITH_DATABASE = frozenset({"keys", "memory", "guardian", "broker"})


@dataclass(frozen=True)
class DaemonOptions:
    role: str
    listen: str
    metrics_port: int | None = 0
    insecure_dev: bool = False
    ready_file: Path | None = None
    lifeline_fd: int | None = None
    """Read end of the supervisor's lifeline (``federation up``): stop when it closes."""


class DaemonError(RuntimeError):
    pass


async def serve(settings: Settings, options: DaemonOptions) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    if options.role not in ROLES_WITH_SERVICES:
        raise DaemonError(
            f"role {options.role!r} has no service to run; node roles are: "
            + ", ".join(ROLES_WITH_SERVICES)
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if options.lifeline_fd is not None:
        watch_lifeline(options.lifeline_fd, stop.set,
                       hard_deadline=settings.supervisor.orphan_stop_seconds)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(tracing.configure(settings.tracing, options.role))  # flushed last
        server = await _start(settings, options, stack)
        if options.ready_file is not None:
            _write_ready_file(options.ready_file, options.role, server)
        await stop.wait()
        log.info("shutdown requested")
    log.info("stopped")


async def _start(
    settings: Settings, options: DaemonOptions, stack: contextlib.AsyncExitStack
) -> NodeServer:
    credentials = None
    if not options.insecure_dev:
        try:
            credentials = certificate_files(
                settings.home, settings.trust_domain, options.role, settings.node_name
            )
        except PKIError as exc:
            raise DaemonError(str(exc)) from exc
    database = None
    if options.role in ROLES_WITH_DATABASE:
        if not settings.database.url:
            raise DaemonError(
                f"the {options.role} node needs PostgreSQL: set FEDERATION_DATABASE_URL "
                "(or start the whole federation with `federation up`)"
            )
        database = Database(settings.database.url, settings.database)
        await database.start()
        stack.push_async_callback(database.stop)
    registry = CollectorRegistry()
    register_process_metrics(registry, settings, options.role, credentials)
    cleanup = await stack.enter_async_context(contextlib.AsyncExitStack())
    runtime = NodeRuntime(settings, options.role, credentials, database, registry, cleanup)
    registration = await SERVICES[options.role](runtime)
    server = NodeServer(
        [registration],
        trust_domain=settings.trust_domain,
        grpc_config=settings.grpc,
        listen=options.listen,
        credentials=credentials,
        metrics_host=settings.nodes.metrics_host,
        metrics_port=options.metrics_port,
        registry=registry,
        enrollment_listen=_enrollment_listen(settings, options),
        deny_list=_deny_list(settings),
    )
    await server.start()
    runtime.server = server
    stack.push_async_callback(server.stop)
    if database is not None:
        # NOT_SERVING on gRPC health while PostgreSQL is unreachable, SERVING again after.
        watch = DatabaseWatch.of(database, server.set_serving)
        registry.register(database_up_collector(lambda: watch.reachable))
        await watch.start()
        stack.push_async_callback(watch.stop)
    return server


def _deny_list(settings: Settings) -> DenyList:
    try:
        return DenyList(settings.home / settings.grpc.deny_list_file,
                        settings.grpc.deny_list_reload_seconds)
    except PKIError as exc:
        raise DaemonError(str(exc)) from exc


def _enrollment_listen(settings: Settings, options: DaemonOptions) -> str | None:
    """The broker's second port, on the same host, where devices without a
    certificate may call Enroll (TLS, no client certificate)."""
    if options.role != "broker" or options.insecure_dev:
        return None
    host = options.listen.rsplit(":", 1)[0]
    return f"{host}:{settings.edge.enrollment_port}"


def _write_ready_file(path: Path, role: str, server: NodeServer) -> None:
    info: dict[str, Any] = {
        "role": role,
        "pid": os.getpid(),
        "grpc_port": server.port,
        "metrics_port": server.metrics_port,
    }
    if server.enrollment_port:
        info["enrollment_port"] = server.enrollment_port
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
