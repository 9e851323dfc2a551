"""``GET /health``: every component's gRPC health, probed now, with a deadline each.

200 when every configured component serves, 503 otherwise. Inference counts
as up while at least one node serves (the router works around the others);
each node's own status is listed. The database is probed directly (``SELECT 1``
through the gateway's own pool) when the gateway has one. Addresses are not
shown: the endpoint is unauthenticated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.db import probe as probe_database
from gateway_http.state import DATABASE_POOL, STATE

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
    statuses, database = await asyncio.gather(
        asyncio.gather(
            *(probe(state.channels[r], timeout) for r in roles),
            *(probe(n.channel, timeout, "federation.v1.InferenceService") for n in nodes),
        ),
        _database_status(request.app, timeout),
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
    return web.json_response(
        {"status": "ok" if healthy else "unavailable", "components": components},
        status=200 if healthy else 503,
    )


async def _database_status(app: web.Application, deadline: float) -> str:
    pool = app.get(DATABASE_POOL)
    if pool is None:
        return "not_configured"
    return "serving" if await probe_database(pool, deadline) else "unreachable"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
