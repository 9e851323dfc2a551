"""The running federation as the local operator reaches it: ``endpoints.json`` (written
by ``federation up``), its database, the admin identity and an mTLS channel to any node.

Library code (the CLI and ``federation.backup``) uses it; it raises
:class:`~federation.errors.CommandError` with a message for people.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import psutil

from federation.channels import secure_channel
from federation.config import Settings
from federation.errors import CommandError
from federation.pki import ADMIN_NAME, CertificateFiles, PKIError, certificate_files


def load_endpoints(settings: Settings) -> dict[str, Any]:
    """The running federation's addresses, written by ``federation up``."""
    path = settings.endpoints_file
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(
            f"no running federation found ({path} is missing); start one with `make run` "
            "or `federation up`, or set FEDERATION_HOME"
        ) from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path} is not valid JSON: {exc}") from exc
    return data


def supervisor_alive(pid: int, written: float) -> bool:
    """Whether the ``federation up`` that wrote an endpoints file at ``written`` (its
    mtime) as ``pid`` still runs: that process, started before the file was written
    (not a later one that reused the pid), not a zombie."""
    try:
        process = psutil.Process(pid)
        return (process.create_time() <= written and process.status() != psutil.STATUS_ZOMBIE
                and any("federation" in part for part in process.cmdline()))
    except psutil.Error:
        return False


def _check_running(settings: Settings, endpoints: dict[str, Any]) -> None:
    """Refuse, in words, addresses left by a ``federation up`` that is gone (killed, or
    the machine restarted): gRPC would only say it could not connect."""
    pid = endpoints.get("supervisor_pid")
    path = settings.endpoints_file
    try:
        written = path.stat().st_mtime
    except OSError:
        return
    if isinstance(pid, int) and pid > 0 and not supervisor_alive(pid, written):
        raise CommandError(
            f"the federation of {settings.home} is not running (its supervisor, pid {pid}, "
            f"has exited; {path.name} is left from that run): start it with `make run` or "
            "`federation up`")


def operator_actor(settings: Settings) -> str:
    """The audit actor of operator commands: the local admin identity's SPIFFE id."""
    return f"spiffe://{settings.trust_domain}/node/{ADMIN_NAME}/admin"


def database_url(settings: Settings) -> str:
    """The federation's database: FEDERATION_DATABASE_URL, else endpoints.json."""
    if settings.database.url:
        return settings.database.url
    dsn = load_endpoints(settings).get("database", {}).get("dsn")
    if not dsn:
        raise CommandError(
            "no database found: set FEDERATION_DATABASE_URL or start `federation up`")
    return str(dsn)


def admin_credentials(settings: Settings) -> CertificateFiles:
    try:
        return certificate_files(settings.home, settings.trust_domain, "admin", ADMIN_NAME)
    except PKIError as exc:
        raise CommandError(str(exc)) from exc


def node_address(settings: Settings, role: str) -> str:
    """Address of ``role``: peers configuration first, then endpoints.json."""
    configured = settings.peers.addresses(role)
    if configured:
        return configured[0]
    endpoints = load_endpoints(settings)
    _check_running(settings, endpoints)
    nodes = endpoints.get("nodes", {})
    if role not in nodes:
        raise CommandError(f"the running federation has no {role} node")
    return str(nodes[role]["grpc"])


def admin_channel(settings: Settings, role: str) -> grpc.aio.Channel:
    """An mTLS channel to ``role``'s node as the local operator (admin role)."""
    return secure_channel(node_address(settings, role), admin_credentials(settings), settings.grpc)
