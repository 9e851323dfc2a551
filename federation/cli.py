"""The ``federation`` command: for people and for scripts.

Every command prints one clear line on stderr and exits non-zero on failure;
``--json`` (where offered) prints machine-readable output instead of text.
Command groups owned by a subsystem live in their own ``cli_*`` module and
register themselves through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc

from federation import logs
from federation.cli_support import CommandError, fail, print_json
from federation.config import ALL_ROLES, ROLES_WITH_SERVICES, ConfigError, Settings, load_settings
from federation.errors import FederationError, from_rpc_error
from federation.pki import CertificateAuthority, PKIError, load_ca

Handler = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

COMMAND_MODULES: tuple[str, ...] = (
    "federation.cli_keys", "federation.cli_audit", "federation.cli_edge", "federation.cli_vault",
    "federation.cli_tenants", "federation.cli_council", "federation.cli_status",
    "federation.cli_backup",
)
"""Modules that add command groups of their own."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federation",
        description="Run and operate a federation of mTLS gRPC nodes behind an "
        "OpenAI-compatible gateway.",
    )
    parser.add_argument(
        "--home", help="federation home (default $FEDERATION_HOME or ./.federation)"
    )
    parser.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pki(commands)
    _add_node(commands)
    _add_up(commands)
    _add_gateway(commands)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(commands)
    return parser


def _add_pki(commands: Any) -> None:
    pki = commands.add_parser("pki", help="the federation's certificate authority")
    sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the federation CA under the home")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--json", action="store_true")
    init.set_defaults(handler=_pki_init)
    issue = sub.add_parser("issue", help="issue a certificate for a node, operator or device")
    issue.add_argument("--role", required=True, choices=ALL_ROLES)
    issue.add_argument("--name", required=True)
    issue.add_argument("--dns", action="append", default=[], help="extra DNS name (repeatable)")
    issue.add_argument("--ip", action="append", default=[], help="extra IP address (repeatable)")
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(handler=_pki_issue)


_LIFELINE_HELP = "stop when this inherited descriptor closes (set by `federation up`)"


def _add_node(commands: Any) -> None:
    node = commands.add_parser("node", help="run one role as a gRPC daemon")
    node.add_argument("--role", required=True, choices=ALL_ROLES)
    node.add_argument("--listen", help="HOST:PORT to serve on (port 0 picks a free one)")
    node.add_argument(
        "--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 picks a free one)"
    )
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
    up.add_argument("--http-port", type=int, help="gateway HTTP port (default 8080; 0 = free)")
    up.add_argument("--http-host", help="gateway HTTP host (default 127.0.0.1)")
    up.add_argument("--database-url", help="external PostgreSQL (default: embedded)")
    up.add_argument("--json", action="store_true", help="print endpoints as JSON when ready")
    up.set_defaults(handler=_up)


def _add_gateway(commands: Any) -> None:
    gateway = commands.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    gateway.add_argument("--http-port", type=int, help="HTTP port (default 8080; 0 = free)")
    gateway.add_argument("--http-host", help="HTTP host (default 127.0.0.1)")
    gateway.add_argument("--ready-file", help="write the bound port here as JSON once serving")
    gateway.add_argument("--lifeline-fd", type=int, help=_LIFELINE_HELP)
    gateway.set_defaults(handler=_gateway)


async def _pki_init(settings: Settings, args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(settings.home, settings.trust_domain, force=args.force)
    if args.json:
        print_json({"ca_cert": str(ca.paths.ca_cert.resolve()), "trust_domain": ca.trust_domain})
    else:
        print(f"created federation CA {ca.paths.ca_cert} (trust domain {ca.trust_domain})")
    return 0


async def _pki_issue(settings: Settings, args: argparse.Namespace) -> int:
    ca = load_ca(settings.home, settings.trust_domain)
    files = ca.issue(
        args.role,
        args.name,
        dns_names=("localhost", *args.dns),
        ip_addresses=("127.0.0.1", "::1", *args.ip),
    )
    if args.json:
        print_json(
            {
                "identity": files.identity.spiffe_id,
                "cert": str(files.cert.resolve()),
                "key": str(files.key.resolve()),
                "ca_cert": str(files.ca_cert.resolve()),
            }
        )
    else:
        print(f"issued {files.identity.spiffe_id}\n  cert {files.cert}\n  key  {files.key} (0600)")
    return 0


async def _node(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from nodes.daemon import DaemonOptions, serve

    if args.role not in ROLES_WITH_SERVICES:
        raise CommandError(
            f"role {args.role!r} has no service to run; node roles are: "
            + ", ".join(ROLES_WITH_SERVICES)
        )
    if args.insecure_dev:
        print(
            "WARNING: --insecure-dev serves plaintext gRPC without client certificates; "
            "development only.",
            file=sys.stderr,
        )
    listen = args.listen or f"{settings.nodes.host}:{settings.port_for(args.role)}"
    options = DaemonOptions(
        role=args.role,
        listen=listen,
        metrics_port=args.metrics_port,
        insecure_dev=args.insecure_dev,
        ready_file=Path(args.ready_file) if args.ready_file else None,
        lifeline_fd=args.lifeline_fd,
    )
    logs.configure(f"node:{args.role}", settings.log_level)
    await serve(settings, options)
    return 0


async def _up(settings: Settings, args: argparse.Namespace) -> int:
    from federation.up import run_federation

    return await run_federation(settings, json_output=args.json)


async def _gateway(settings: Settings, args: argparse.Namespace) -> int:
    from gateway_http.app import run_gateway

    logs.configure("gateway", settings.log_level)
    exit_code: int = await run_gateway(settings, ready_file=args.ready_file,
                                       lifeline_fd=args.lifeline_fd)
    return exit_code


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "home": getattr(args, "home", None),
        "log_level": getattr(args, "log_level", None),
        "gateway.http_port": getattr(args, "http_port", None),
        "gateway.http_host": getattr(args, "http_host", None),
        "database.url": getattr(args, "database_url", None),
        "node_name": getattr(args, "name", None) if args.command == "node" else None,
    }
    return {k: v for k, v in values.items() if v is not None}


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (every process of a federation starts here)."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _operator_errors() -> tuple[type[Exception], ...]:
    from federation.db import DatabaseUnavailable
    from federation.db.embedded import EmbeddedPostgresError
    from federation.db.migrate import MigrationError
    from nodes.daemon import DaemonError

    return (
        CommandError,
        ConfigError,
        PKIError,
        DaemonError,
        DatabaseUnavailable,
        EmbeddedPostgresError,
        MigrationError,
    )


_OPERATOR_ERRORS = _operator_errors()
"""Failures an operator can fix: reported as one line, never a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(_overrides(args))
        handler: Handler = args.handler
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(handler(settings, args))
    except KeyboardInterrupt:
        return 130
    except _OPERATOR_ERRORS as exc:
        fail(str(exc))
    except FederationError as exc:
        fail(exc.message, 2 if exc.spec.http_status < 500 else 1)
    except grpc.RpcError as exc:
        fail(from_rpc_error(exc).message)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


if __name__ == "__main__":
    sys.exit(main())
