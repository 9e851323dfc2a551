"""Typed application and request state of the gateway (aiohttp ``AppKey``/``RequestKey``)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from aiohttp import web

from federation.config import Settings
from federation.db import DatabaseWatch
from federation.inference.client import InferenceRouter
from federation.keys.client import KeyPrincipal, KeyVerifier
from federation.keys.lease_book import LeaseBook
from federation.memory.sink import AuditSink
from gateway_http.background import BackgroundTasks
from gateway_http.chat.serving import ChatOutcome, ChatServing
from gateway_http.database_probe import NewConnectionProbe
from gateway_http.metrics import GatewayMetrics
from gateway_http.outbox import Outbox
from gateway_http.request_rate import RequestRate


@dataclass
class GatewayState:
    """Everything the handlers share, built once at startup (see ``app.py``)."""

    settings: Settings
    router: InferenceRouter
    keys: KeyVerifier
    audit: AuditSink
    metrics: GatewayMetrics
    background: BackgroundTasks
    chat: ChatServing
    channels: dict[str, grpc.aio.Channel]
    """Channels to the other components (by role), for health probes."""
    outbox: Outbox
    """Durable spool of the records written after an answer is decided."""
    request_rate: RequestRate | None = None
    """Counts the requests that generate nothing (the vault's) against their key's
    request rate; ``None`` with a stand-in key verifier (tests, benchmarks), which has no
    key authority to count with."""
    leases: LeaseBook | None = None
    """The quota leases requests are admitted from (``keys.quota_leases``); ``None``
    when every request reserves on its own (a stand-in key verifier, or leases off)."""
    in_progress: int = 0
    """Requests whose handling, spooling of their after-work included, has not ended
    (a streamed response is on the wire before its settlement is spooled)."""


STATE = web.AppKey("gateway_state", GatewayState)
DATABASE_WATCH = web.AppKey("database_watch", DatabaseWatch)
"""Watches the gateway's own database (the vault's) for ``/health``; absent without one."""
DATABASE_NEW_CONNECTION = web.AppKey("database_new_connection", NewConnectionProbe)
"""Whether ``/health`` can open a new connection to that database; absent without one."""

REQUEST_ID = web.RequestKey("request_id", str)
"""The gateway's own id of the request (``X-Request-Id`` of its answer, the audit trail's
key, gRPC metadata); never the client's."""
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str)
"""The client's ``X-Request-Id``, validated (``federation.logs.client_request_id``);
``""`` without one. Kept in the audit record and the log lines, nowhere else."""
PRINCIPAL = web.RequestKey("principal", KeyPrincipal)
MODEL = web.RequestKey("model", str)
"""Set only once the model is known to exist, so metrics labels stay bounded."""
OUTCOME = web.RequestKey("chat_outcome", ChatOutcome)
AUDITED = web.RequestKey("audited", bool)
"""Set once the request's audit record is durably written (before its response completed)."""
STARTED = web.RequestKey("started", float)
