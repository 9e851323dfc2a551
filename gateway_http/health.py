"""``GET /health``: every component's gRPC health, probed now, with a deadline each.

200 when every configured component serves, 503 otherwise. Inference counts
as up while at least one node serves (the router works around the others);
each node's own status is listed. The database's status, when the gateway has a
database, is the gateway's own database watch (a probe every second on a long-lived
connection of its own: probing through the pool could hang a caller of ``/health`` for
the pool's timeouts) and, while the watch sees it answer, whether a *new* connection
can be made (``gateway_http/database_probe.py``): with only the postmaster frozen, sessions
already open keep answering while every new connection hangs, which ``federation
status`` reports as unreachable. Under ``federation up`` each component also
shows its supervision state (``supervisor``: running, restarting or failed,
restarts, last exit). Addresses and PIDs are not shown: the endpoint is
unauthenticated.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.launch.state import live_state
from gateway_http.state import DATABASE_NEW_CONNECTION, DATABASE_WATCH, STATE

COMPONENTS = ("keys", "memory", "guardian", "council", "broker")


async def probe(channel: grpc.aio.Channel, deadline: float, service: str = "") -> str:
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return "unreachable" if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                               grpc.StatusCode.DEADLINE_EXCEEDED) else "down"
    return "serving" if response.status == health_pb2.HealthCheckResponse.SERVING else "down"


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    timeout = state.settings.gateway.health_timeout_seconds
    roles = [r for r in COMPONENTS if r in state.channels]
    nodes = list(state.router.nodes)
    database, *statuses = await asyncio.gather(
        _database_status(request.app),  # beside the other probes: bounded by the same time
        *(probe(state.channels[r], timeout) for r in roles),
        *(probe(n.channel, timeout, "federation.v1.InferenceService") for n in nodes),
    )
    components: dict[str, Any] = {}
    for role, status in zip(roles, statuses[: len(roles)], strict=True):
        components[role] = {"status": status}
    for role in COMPONENTS:
        components.setdefault(role, {"status": "not_configured"})
    node_statuses = statuses[len(roles):]
    components["inference"] = {
        "status": "serving" if "serving" in node_statuses else "down",
        "nodes": [
            {"node": f"inference-{i}", "status": s, "models": sorted(n.models)}
            for i, (n, s) in enumerate(zip(nodes, node_statuses, strict=True))
        ],
    }
    components["database"] = {"status": database}
    healthy = all(c["status"] in ("serving", "not_configured") for c in components.values())
    body: dict[str, Any] = {"status": "ok" if healthy else "unavailable",
                            "components": components}
    _add_supervision(body, state.settings.home)
    return web.json_response(body, status=200 if healthy else 503)


SUPERVISED_AS = {"postgres": "database"}
"""Component under which a supervised child's state is shown, where the names differ."""


def _add_supervision(body: dict[str, Any], home: Path) -> None:
    """Under ``federation up``, each component's supervision state (running, restarting,
    failed; restarts; last exit), and every supervised child under ``supervisor``."""
    supervisor = live_state(home.resolve())
    if supervisor is None:
        return
    children = {name: child.public() for name, child in supervisor.children.items()}
    for name, public in children.items():
        component = body["components"].get(SUPERVISED_AS.get(name, name))
        if component is not None:
            component["supervisor"] = public
    body["supervisor"] = {"children": children}


async def _database_status(app: web.Application) -> str:
    watch = app.get(DATABASE_WATCH)
    if watch is None:
        return "not_configured"
    if not watch.reachable:
        return "unreachable"
    new_connection = app.get(DATABASE_NEW_CONNECTION)
    if new_connection is not None and not await new_connection.possible():
        return "unreachable"
    return "serving"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
