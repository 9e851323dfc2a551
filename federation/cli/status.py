"""``federation status``: is every part of the federation serving?

On a home run by ``federation up``: probes every node's ``grpc.health.v1`` with the
operator's certificate (mTLS), the gateway's ``/health`` and the database, and joins
what it finds with the supervisor's state (``run/supervisor.json``: running,
restarting or failed, restarts, last exit). Across hosts (``--peers``, or when no
supervisor runs here but ``[peers]`` is configured): one line per node of the peers
configuration with its health, version, certificate expiry and address
(:mod:`federation.launch.probe`). A table for people, ``--json`` for scripts; the exit
code is 0 only when everything serves.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.cli.support import print_json
from federation.config import Settings
from federation.errors import CommandError
from federation.launch.endpoints import admin_credentials, load_endpoints
from federation.launch.probe import peer_targets, probe_peers
from federation.launch.state import ChildState, ChildStatus, SupervisorState, live_state
from federation.launch.supervisor import HomeLock
from federation.pki import CertificateFiles

SERVING = "serving"
STARTING = "starting"
"""The health of every component while ``federation up`` starts: not probed, since the
addresses of this run are not known before ``endpoints.json`` is written."""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = subparsers.add_parser(
        "status", help="health and supervision state of every component; non-zero unless "
                       "all serve")
    status.add_argument("--peers", action="store_true",
                        help="every node of the peers configuration, on any host")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=show_status)


@dataclass
class ComponentStatus:
    name: str
    health: str
    """``serving``, ``not_serving``, ``unreachable`` or (not probed yet) ``starting``."""
    state: str
    """The supervisor's view: ``running``, ``restarting``, ``failed``… (``-``: not supervised)."""
    pid: int | None
    restarts: int
    last_exit: str
    address: str
    log: str


async def show_status(settings: Settings, args: argparse.Namespace) -> int:
    home = settings.home.resolve()
    state = live_state(home)
    if args.peers or (state is None and peer_targets(settings)):
        return await _show_peers(settings, args.json)
    if state is None:
        if (starting := HomeLock.holder(home)) is not None:
            raise CommandError(f"the federation on {home} is starting (supervisor pid "
                               f"{starting}); ask again once it is up")
        raise CommandError(f"no federation is running on {home} (start one with `make run` "
                           "or `federation up`, or set FEDERATION_HOME)")
    endpoints = _current_endpoints(settings, state)
    if endpoints is None:
        components = [_component(name, "", STARTING, child)
                      for name, child in state.children.items()]
    else:
        components = await _probe_all(settings, endpoints, state)
    healthy = all(c.health == SERVING for c in components)
    if args.json:
        print_json({"home": str(home), "supervisor_pid": state.pid, "healthy": healthy,
                    "starting": endpoints is None,
                    "components": {c.name: _json(c) for c in components}})
    else:
        _print_table(components, state)
    return 0 if healthy else 1


def _current_endpoints(settings: Settings, state: SupervisorState) -> dict[str, Any] | None:
    """The live supervisor's ``endpoints.json``; ``None`` while it is starting, when there
    is none yet or only one left by an earlier run (whose addresses are not this run's:
    probing them would call serving components unreachable)."""
    try:
        endpoints = load_endpoints(settings)
    except CommandError:
        return None
    return endpoints if endpoints.get("supervisor_pid") == state.pid else None


async def _probe_all(settings: Settings, endpoints: dict[str, Any],
                     state: SupervisorState) -> list[ComponentStatus]:
    credentials = admin_credentials(settings)
    timeout = settings.gateway.health_timeout_seconds
    targets: list[tuple[str, str, Any]] = []
    database = endpoints.get("database", {})
    if database.get("dsn"):
        name = "postgres" if database.get("embedded") else "database"
        dsn = urlsplit(database["dsn"])  # host and port only: the DSN holds the password
        targets.append((name, f"{dsn.hostname}:{dsn.port}",
                        _probe_database(database["dsn"], timeout)))
    for role, node in endpoints.get("nodes", {}).items():
        targets.append((role, node["grpc"],
                        _probe_node(node["grpc"], credentials, settings, timeout)))
    gateway = endpoints.get("gateway", {})
    if gateway.get("url"):
        targets.append(("gateway", gateway["url"], _probe_gateway(gateway["url"], timeout)))
    healths = await asyncio.gather(*(probe for _, _, probe in targets))
    return [_component(name, address, health, state.children.get(name))
            for (name, address, _), health in zip(targets, healths, strict=True)]


def _component(name: str, address: str, health: str,
               child: ChildStatus | None) -> ComponentStatus:
    if child is None:
        return ComponentStatus(name, health, "-", None, 0, "", address, "")
    pid = None if child.state == ChildState.FAILED else child.pid
    return ComponentStatus(name, health, str(child.state), pid, child.restarts,
                           child.last_exit, address, child.log)


async def _probe_node(target: str, credentials: CertificateFiles, settings: Settings,
                      seconds: float) -> str:
    async with secure_channel(target, credentials, settings.grpc) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=seconds)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "unreachable"
            return "not_serving"
    return SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else "not_serving"


async def _probe_gateway(url: str, seconds: float) -> str:
    """Serving when it answers ``/health`` at all: 503 there means a component is down,
    which that component's own row shows."""
    try:
        async with aiohttp.ClientSession() as session, session.get(
                url + "/health", timeout=aiohttp.ClientTimeout(total=seconds * 2)):
            return SERVING
    except (aiohttp.ClientError, TimeoutError):
        return "unreachable"


async def _probe_database(dsn: str, seconds: float) -> str:
    try:
        conn = await asyncpg.connect(dsn, timeout=seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return "unreachable"
    try:
        await conn.fetchval("SELECT 1", timeout=seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return "not_serving"
    finally:
        await conn.close()
    return SERVING


async def _show_peers(settings: Settings, json_output: bool) -> int:
    if not peer_targets(settings):
        raise CommandError("no nodes in the peers configuration ([peers] in federation.toml)")
    probes = await probe_peers(settings, admin_credentials(settings))
    healthy = all(p.health == SERVING for p in probes)
    if json_output:
        print_json({"healthy": healthy, "nodes": [asdict(p) for p in probes]})
        return 0 if healthy else 1
    now = dt.datetime.now(dt.UTC)
    rows = [("ROLE", "ADDRESS", "HEALTH", "VERSION", "CERTIFICATE EXPIRES", "IDENTITY")]
    for p in probes:
        expires = "-"
        if p.certificate_expires is not None:
            days = (p.certificate_expires - now).total_seconds() / 86400
            expires = f"{p.certificate_expires:%Y-%m-%d %H:%M} ({days:.0f}d)"
        rows.append((p.role, p.address, p.health, p.version or "-", expires,
                     p.identity or p.problem or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    down = [f"{p.role} at {p.address} ({p.health}{': ' + p.problem if p.problem else ''})"
            for p in probes if p.health != SERVING]
    print(f"\nall {len(probes)} nodes serving" if not down
          else f"\n{len(down)} of {len(probes)} not serving: " + "; ".join(down))
    return 0 if healthy else 1


def _json(component: ComponentStatus) -> dict[str, Any]:
    data = asdict(component)
    del data["name"]
    return data


def _print_table(components: list[ComponentStatus], state: SupervisorState) -> None:
    header = ("COMPONENT", "HEALTH", "STATE", "PID", "RESTARTS", "LAST EXIT", "ADDRESS")
    rows = [header] + [
        (c.name, c.health, c.state, str(c.pid or "-"), str(c.restarts), c.last_exit or "-",
         c.address or "-")
        for c in components
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    down = [c for c in components if c.health != SERVING]
    if all(c.health == STARTING for c in components):
        print(f"\nthe federation is starting (supervisor pid {state.pid}); ask again once "
              "it is up")
        return
    if not down:
        print(f"\nall {len(components)} components serving (supervisor pid {state.pid})")
        return
    listed = ", ".join(f"{c.name} ({c.health}, {c.state})" for c in down)
    failed = [c for c in down if c.state == "failed"]
    print(f"\n{len(down)} of {len(components)} not serving: {listed}")
    for c in failed:
        print(f"{c.name} failed after {c.restarts} restarts ({c.last_exit}); see {c.log}")
