"""Structured (JSON lines) logging with the request id and caller of each RPC.

The request id and the caller's identity live in context variables set by the
server interceptor, so every log record written while serving a call carries
them without threading them through function signatures.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
peer_var: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="")

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID_LENGTH = 128


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """Accept a caller's request id if it is short printable ASCII, else mint one."""
    if value and len(value) <= _MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable():
        return value
    return new_request_id()


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
        return True


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
