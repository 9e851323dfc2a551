"""The ``federation`` command: for people and for scripts.

Every command prints one clear line on stderr and exits non-zero on failure;
``--json`` (where offered) prints machine-readable output instead of text.
Each command group is one module of this package with a ``register(commands)``
function; :data:`COMMAND_GROUPS` lists them all. ``federation.cli`` is the top
layer of the import graph (see ``tests/test_layers.py``): it may import the
daemons and the gateway, and nothing imports it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine, Sequence
from types import ModuleType
from typing import Any

import grpc

from federation.cli import (
    audit,
    backup,
    certs,
    council,
    db,
    edge,
    keys,
    pki,
    run,
    status,
    tenants,
    vault,
)
from federation.cli.support import fail
from federation.config import ConfigError, Settings, load_settings
from federation.db import DatabaseUnavailable
from federation.db.embedded import EmbeddedPostgresError
from federation.db.migrate import MigrationError
from federation.errors import CommandError, FederationError, from_rpc_error
from federation.pki import PKIError

Handler = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]

COMMAND_GROUPS: tuple[ModuleType, ...] = (
    pki, certs, run, keys, audit, edge, vault, tenants, council, status, backup, db,
)
"""The modules whose ``register`` adds the commands, in ``--help`` order."""

OPERATOR_ERRORS: tuple[type[Exception], ...] = (
    CommandError,
    ConfigError,
    PKIError,
    DatabaseUnavailable,
    EmbeddedPostgresError,
    MigrationError,
)
"""Failures an operator can fix: reported as one line, never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="federation",
        description="Run and operate a federation of mTLS gRPC nodes behind an "
        "OpenAI-compatible gateway.",
    )
    parser.add_argument(
        "--home", help="federation home (default $FEDERATION_HOME or ./.federation)"
    )
    parser.add_argument("--log-level", dest="log_level", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


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
    except OPERATOR_ERRORS as exc:
        fail(str(exc))
    except FederationError as exc:
        fail(exc.message, 2 if exc.spec.http_status < 500 else 1)
    except grpc.RpcError as exc:
        fail(from_rpc_error(exc).message)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
