"""Structured (JSON lines) logging with the request id and caller of each RPC.

The request id and the caller's identity live in context variables set by the
server interceptor (and the gateway's lifecycle middleware), so every log record
written while serving a call carries them without threading them through function
signatures. At the HTTP gateway the request id is always the gateway's own; an id a
client sent is only a label of its own (``client_request_id``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
peer_var: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="")
client_request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "client_request_id", default="")
"""The ``X-Request-Id`` an HTTP client sent (validated), beside the gateway's own id."""

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID_LENGTH = 128
_CLIENT_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{_MAX_REQUEST_ID_LENGTH}}}")


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """Accept a federation caller's request id (gRPC metadata, from an authenticated
    peer) if it is short printable ASCII, else mint one."""
    if value and len(value) <= _MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def client_request_id(value: str | None) -> str:
    """An HTTP client's ``X-Request-Id`` as a label to keep beside the gateway's own id:
    up to 128 letters, digits and ``._:-`` (a UUID, a ULID, ``req_…``); anything else is
    dropped (``""``). Never the request id itself: a client choosing it could merge its
    audit trail with another's, or write into another tenant's."""
    if value and _CLIENT_REQUEST_ID.fullmatch(value):
        return value
    return ""


class ContextFilter(logging.Filter):
    """Stamps each record with the request id and caller of the RPC being served.

    Runs when the record is logged, inside the caller's context, so the values
    are right even if formatting happens later or elsewhere.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and (request_id := request_id_var.get()):
            record.request_id = request_id
        if not hasattr(record, "peer") and (peer := peer_var.get()):
            record.peer = peer
        if not hasattr(record, "client_request_id") and (client := client_request_id_var.get()):
            record.client_request_id = client
        return True


class OneLineReasonFilter(logging.Filter):
    """Logs a failure's reason as one ``error`` field instead of its traceback.

    For asyncpg's pool, which logs a whole traceback each time it fails to restore its
    connection floor: through a database outage that is every 1 to 60 s per process,
    and the reason ("Connect call failed", "the database system is starting up") is all
    an operator needs. Our own code logs its failures itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            record.exc_info = None
            record.exc_text = None
        return True


QUIET_TRACEBACK_LOGGERS = ("asyncpg.pool",)
"""Loggers whose failures are logged as one line (:class:`OneLineReasonFilter`)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, extras."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def configure(component: str, level: str = "INFO") -> None:
    """Send JSON logs to stderr. Called once by each process's entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and asyncio chatter at INFO is noise for operators.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    for name in QUIET_TRACEBACK_LOGGERS:
        quiet = logging.getLogger(name)
        if not any(isinstance(f, OneLineReasonFilter) for f in quiet.filters):
            quiet.addFilter(OneLineReasonFilter())
