"""Which database failures are outages, and what a caller is told about them.

An outage (PostgreSQL gone, restarting, stalled or out of connections) is not a
bug of ours and not the caller's fault: it is UNAVAILABLE (HTTP 503) with a
retry hint, never INTERNAL (500) and never an authentication failure. Both
edges (the gRPC interceptor and the HTTP gateway) ask :func:`outage_error`
before falling back to "Internal server error.".
"""

from __future__ import annotations

import logging
import os
from typing import Any, Final

import asyncpg

from federation.db import DatabaseUnreachable
from federation.errors import ErrorCode, FederationError

RETRY_AFTER_SECONDS: Final = 2.0
"""What callers are told to wait: about one probe interval plus a reconnect."""

OUTAGE_MESSAGE: Final = "the database is unavailable; retry shortly"

DISK_FULL_MESSAGE: Final = ("the database is out of disk space: writes are refused until an "
                            "operator frees space")
DISK_FULL_RETRY_AFTER_SECONDS: Final = 30.0
"""Freeing space takes a person: retrying every two seconds would only add load."""

EXIT_DATABASE_UNAVAILABLE: Final = 69
"""The exit status of a process that could not start because the database is unavailable
(EX_UNAVAILABLE). ``federation up`` retries it at its back-off without counting it
towards a crash loop: the process is not broken, and must come back by itself once the
database does (a node restarted during an outage would otherwise end ``failed``)."""

_SERVER_OUTAGES: Final = (
    asyncpg.PostgresConnectionError,  # class 08: connection lost, refused, rejected
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: the server is being stopped
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed, the server restarts
    asyncpg.QueryCanceledError,  # 57014: statement timeout (stalled server)
    asyncpg.TooManyConnectionsError,  # 53300
    DatabaseUnreachable,  # a pool failing fast during an outage it knows of
    # No writable server among a multi-host DSN's (all standbys, before a promotion).
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.ReadOnlySQLTransactionError,  # 25006: a pooled connection to a demoted server
)

_CLIENT_SIDE: Final = (TimeoutError, OSError, asyncpg.InterfaceError,
                       asyncpg.exceptions.InternalClientError)
"""Raised by the client library when the server is gone or silent (connect, acquire
and command timeouts, refused or reset sockets, "connection is closed"; and "cannot
switch to state 15; another operation is in progress" when the server dies during
the reset of a connection being released to the pool, seen in a failover). The same
types can come from elsewhere (a full disk is an OSError too), so they count only
when asyncpg raised them."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) means the database is unreachable."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _SERVER_OUTAGES):
            return True
        if isinstance(current, _CLIENT_SIDE) and _raised_in_asyncpg(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _raised_in_asyncpg(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if f"{os.sep}asyncpg{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is PostgreSQL out of disk space
    (SQLSTATE 53100: a table, index or temporary file could not grow)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, asyncpg.DiskFullError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def outage_error(exc: BaseException) -> FederationError | None:
    """The UNAVAILABLE error to answer ``exc`` with, or ``None`` if it is not an outage
    (the database unreachable, or out of disk space)."""
    if isinstance(exc, FederationError):
        return None
    if is_disk_full(exc):
        return FederationError(ErrorCode.UNAVAILABLE, DISK_FULL_MESSAGE,
                               retry_after_seconds=DISK_FULL_RETRY_AFTER_SECONDS)
    if not is_outage(exc):
        return None
    return FederationError(
        ErrorCode.UNAVAILABLE, OUTAGE_MESSAGE, retry_after_seconds=RETRY_AFTER_SECONDS
    )


def log_job_failure(log: logging.Logger, message: str, exc: BaseException,
                    **extra: Any) -> None:
    """Log a failure of a background job that retries (a flusher, a sweep, a writer):
    during a database outage as one warning naming it, every retry (the outage itself
    is on ``/health`` and ``federation status``; a traceback each time buries it); any
    other failure at error level with its traceback."""
    error = outage_error(exc)
    if error is not None:
        log.warning("%s: %s", message, error.message, extra=extra)
    else:
        log.error(message, exc_info=exc, extra=extra)
