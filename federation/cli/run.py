"""The commands that run processes: ``federation node``, ``federation gateway`` and
``federation up``.

    federation node --role ROLE [--listen HOST:PORT] [--insecure-dev]
    federation gateway [--http-port P] [--http-host H]
    federation up [--http-port P] [--database-url URL] [--json]

The daemon and the gateway are imported when their command runs, not when the
module is: every other command (an operator's ``federation keys list``, a phone's
``federation edge agent``) starts without loading the servers it does not run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from federation import logs
from federation.cli.arguments import listen_address, port
from federation.cli.support import fail
from federation.config import ROLES_WITH_SERVICES, ConfigError, Settings
from federation.db.errors import EXIT_DATABASE_UNAVAILABLE, is_outage
from federation.errors import CommandError
from federation.launch.up import run_federation

_LIFELINE_HELP = "stop when this inherited descriptor closes (set by `federation up`)"


def register(commands: Any) -> None:
    _add_node(commands)
    _add_up(commands)
    _add_gateway(commands)


def _add_node(commands: Any) -> None:
    node = commands.add_parser("node", help="run one role as a gRPC daemon")
    # The roles a process serves: admin (the operator) and edge (a device) have none.
    node.add_argument("--role", required=True, choices=(*ROLES_WITH_SERVICES, "gateway"))
    node.add_argument("--listen", type=listen_address,
                      help="HOST:PORT to serve on (port 0 picks a free one)")
    node.add_argument(
        "--metrics-port", type=port,
        help="Prometheus /metrics port (default: nodes.<role>_metrics_port; 0 picks a free one)")
    node.add_argument("--name", help="node name in the identity (default: node_name setting)")
    node.add_argument(
        "--insecure-dev",
        action="store_true",
        help="serve plaintext without client certificates (development only)",
    )
    node.add_argument("--ready-file", help="write the bound ports here as JSON once serving")
    node.add_argument("--lifeline-fd", type=int, help=_LIFELINE_HELP)
    node.set_defaults(handler=_node)


def _add_up(commands: Any) -> None:
    up = commands.add_parser("up", help="run the whole federation on this machine")
    up.add_argument("--http-port", type=port, help="gateway HTTP port (default 8080; 0 = free)")
    up.add_argument("--http-host", help="gateway HTTP host (default 127.0.0.1)")
    up.add_argument("--database-url", help="external PostgreSQL (default: embedded)")
    up.add_argument("--json", action="store_true", help="print endpoints as JSON when ready")
    up.set_defaults(handler=_up)


def _add_gateway(commands: Any) -> None:
    gateway = commands.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    gateway.add_argument("--http-port", type=port, help="HTTP port (default 8080; 0 = free)")
    gateway.add_argument("--http-host", help="HTTP host (default 127.0.0.1)")
    gateway.add_argument("--ready-file", help="write the bound port here as JSON once serving")
    gateway.add_argument("--lifeline-fd", type=int, help=_LIFELINE_HELP)
    gateway.set_defaults(handler=_gateway)


async def _node(settings: Settings, args: argparse.Namespace) -> int:
    from nodes.daemon import DaemonError, DaemonOptions, serve

    if args.role == "gateway":
        # One command for every role a host runs: the systemd template is
        # `federation node --role %i`, the gateway included.
        return await _gateway(settings, args)
    if args.insecure_dev:
        print(
            "WARNING: --insecure-dev serves plaintext gRPC without client certificates; "
            "development only.",
            file=sys.stderr,
        )
    listen = args.listen or f"{settings.nodes.host}:{settings.port_for(args.role)}"
    metrics_port = (args.metrics_port if args.metrics_port is not None
                    else settings.nodes.metrics_port_for(args.role))
    options = DaemonOptions(
        role=args.role,
        listen=listen,
        metrics_port=metrics_port,
        insecure_dev=args.insecure_dev,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        lifeline_fd=args.lifeline_fd,
    )
    logs.configure(f"node:{args.role}", settings.log_level)
    try:
        async with _exit_on_database_outage():
            await serve(settings, options)
    except DaemonError as exc:
        raise CommandError(str(exc)) from exc
    return 0


async def _up(settings: Settings, args: argparse.Namespace) -> int:
    return await run_federation(settings, json_output=args.json)


async def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    from gateway_http.app import run_gateway

    logs.configure("gateway", settings.log_level)
    async with _exit_on_database_outage():
        exit_code: int = await run_gateway(settings, ready_file=args.ready_file,
                                           lifeline_fd=args.lifeline_fd)
    return exit_code


@contextlib.asynccontextmanager
async def _exit_on_database_outage() -> AsyncIterator[None]:
    """A process that cannot start (or run) because the database is unavailable exits
    with its own status, one line: ``federation up`` retries it without counting a crash
    loop (see ``EXIT_DATABASE_UNAVAILABLE``). Anything else is left to the caller."""
    try:
        yield
    except Exception as exc:
        # A malformed URL is raised by asyncpg as a client error too: not an outage.
        if isinstance(exc, ConfigError) or not is_outage(exc):
            raise
        # A timeout raised inside asyncpg has no text: the line would end at the colon.
        reason = str(exc) or type(exc).__name__
        fail(f"the database is unavailable: {reason}", EXIT_DATABASE_UNAVAILABLE)
