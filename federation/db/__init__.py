"""PostgreSQL access: one asyncpg pool per process, migrated at start.

Every pool is built by :func:`create_pool`, so every wait on the database is
bounded by configuration: connecting (``connect_timeout_seconds``), waiting for
a pooled connection (``acquire_timeout_seconds``, applied to every
``acquire()``, including the implicit one of ``pool.fetch*``) and each
statement (``command_timeout_seconds``). When PostgreSQL is gone or stalled, a
caller gets an error within those bounds, which :mod:`federation.db.errors`
turns into UNAVAILABLE with a retry hint, instead of hanging.

Pooled connections are not reset when released (:func:`keep_session`): our code
leaves no session state on them, so asyncpg's default reset (``SELECT
pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``, one round trip and
a little server CPU on every release, several per request) would undo nothing.
What that takes: no ``LISTEN``, no ``SET`` outside a transaction (``SET LOCAL``,
as :func:`transaction_as` does, ends with the transaction; a pool's ``init`` may
set what every connection of the pool keeps, like the vault's role), no cursor
``WITH HOLD``, no temporary table, and a session advisory lock only through
:func:`session_advisory_lock`, which ends the session when it cannot unlock. An
open transaction is still rolled back on release (asyncpg does that itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from federation.config import ConfigError, DatabaseConfig
from federation.db.migrate import apply_migrations, check_schema
from federation.db.sessions import session_advisory_lock
from federation.periodic import PeriodicTask
from federation.telemetry import tracing

log = logging.getLogger(__name__)

__all__ = ["session_advisory_lock"]


@contextlib.asynccontextmanager
async def transaction_as(pool: asyncpg.Pool, role: str | None) -> AsyncIterator[Any]:
    """A transaction on one of ``pool``'s connections whose statements run as ``role``
    (``SET LOCAL ROLE``, which ends with the transaction); ``None`` keeps the
    connection's own role."""
    async with pool.acquire() as conn, conn.transaction():
        if role is not None:
            await conn.execute(f"SET LOCAL ROLE {role}")
        yield conn


class DatabaseUnavailable(RuntimeError):
    pass


class DatabaseUnreachable(ConnectionError):
    """Raised at once, without touching the network, while the database is known to be
    unreachable (see :class:`DatabaseWatch`)."""


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose ``acquire()`` waits at most the configured time, and fails
    at once while the database is known to be down.

    asyncpg's own default is to wait for ever, and ``pool.fetchrow`` and friends
    call ``acquire()`` without a timeout: while PostgreSQL is stalled, every
    request would queue behind the pool with no bound. Even bounded, every caller
    would wait the whole timeout during an outage the process already knows about;
    ``known_unreachable`` (set by the database watch) answers them in microseconds.
    """

    def __init__(self, *args: Any, acquire_timeout: float, close_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout
        self.close_timeout = close_timeout
        self.known_unreachable = False

    async def close(self) -> None:
        """asyncpg's graceful close, within ``close_timeout``; past it, the connections are
        dropped (``terminate()``). Each connection asks the server to end its session and
        waits for it to hang up: a stalled server never does, and asyncpg would wait the
        whole command timeout and then raise, so a process stopping during an outage
        took that long and ended in an error. Nothing is lost by dropping them: a pool is
        closed once nothing uses it, and an open transaction is rolled back either way."""
        try:
            await asyncio.wait_for(super().close(), self.close_timeout)
        except Exception as exc:
            log.warning("the database did not answer the pool's close; connections dropped",
                        extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            self.terminate()

    def acquire(self, *, timeout: float | None = None) -> Any:
        if self.known_unreachable:
            raise DatabaseUnreachable("the database is unreachable")
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)

    def abort_connections(self) -> None:
        """Close every connection of the pool now, those lent out included: a statement
        in flight on a server that stopped answering fails at once (an outage, 503 to
        its caller) instead of after ``command_timeout_seconds``, and a connection to a
        server that went away is not handed out again. The pool stays open and connects
        anew on the next ``acquire()`` once the database is back. An aborted commit's
        outcome is unknown to its caller, as with any connection lost mid-commit."""
        # asyncpg has no public way to reach the connections it has lent out; each
        # holder's terminate() closes its connection and returns the holder to the pool.
        for holder in self._holders:  # type: ignore[attr-defined]
            holder.terminate()


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pools' reset on release: nothing to undo (see the module's docstring)."""


async def create_pool(
    url: str,
    config: DatabaseConfig,
    *,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> BoundedPool:
    """A started :class:`BoundedPool`; :class:`DatabaseUnavailable` if PostgreSQL is not there.

    While tracing is on, each statement of its connections becomes a span."""
    logger = tracing.query_logger()
    if logger is not None:
        init = _with_query_logger(init, logger)
    pool = BoundedPool(
        url,
        acquire_timeout=config.acquire_timeout_seconds,
        # What counts as unreachable for a probe is long enough for a server to answer.
        close_timeout=config.probe_timeout_seconds,
        min_size=config.pool_min_size if min_size is None else min_size,
        max_size=config.pool_max_size if max_size is None else max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        command_timeout=config.command_timeout_seconds,
        timeout=config.connect_timeout_seconds,
        init=init,
        reset=keep_session,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    try:
        await pool
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        await pool.close()
        raise _unusable_url(exc) from exc
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        await pool.close()
        raise _cannot_connect(url, config, exc) from exc
    return pool


async def connect(url: str, config: DatabaseConfig) -> asyncpg.Connection:
    """One connection outside any pool (``federation up``'s and ``federation db migrate``'s
    migrations), within ``connect_timeout_seconds``; a failure is one line for people:
    :class:`DatabaseUnavailable` or, for a malformed URL, ``ConfigError``."""
    try:
        return await asyncpg.connect(url, timeout=config.connect_timeout_seconds)
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise _unusable_url(exc) from exc
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        raise _cannot_connect(url, config, exc) from exc


def _unusable_url(exc: Exception) -> ConfigError:
    # A malformed DSN (a port that is not a number, an unknown sslmode): asyncpg's
    # exceptions (ValueError for the port) would end the command in a traceback.
    return ConfigError(f"the database URL is not usable: {exc}")


def _cannot_connect(url: str, config: DatabaseConfig, exc: Exception) -> DatabaseUnavailable:
    """Where (host and port only: the URL may hold a password) and why; a timeout has no
    text of its own."""
    where = urlsplit(url).netloc.rpartition("@")[2]
    why = (f"no answer within {config.connect_timeout_seconds:g}s"
           if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
    return DatabaseUnavailable(f"cannot connect to PostgreSQL at {where}: {why}")


def _with_query_logger(init: Callable[[asyncpg.Connection], Awaitable[None]] | None,
                       logger: Callable[[Any], None]
                       ) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    async def initialise(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(logger)
        if init is not None:
            await init(conn)

    return initialise


class Database:
    """The process's connection pool. ``await start()`` before use, ``await stop()`` after."""

    def __init__(self, url: str, config: DatabaseConfig, *, migrate: bool = True) -> None:
        if not url:
            raise ValueError("a database URL is required")
        self.url = url
        self.config = config
        self._migrate = migrate
        self._pool: BoundedPool | None = None

    @property
    def pool(self) -> BoundedPool:
        if self._pool is None:
            raise RuntimeError("Database.start() has not been awaited")
        return self._pool

    async def start(self) -> None:
        """Open the pool, then apply pending migrations, or (``migrate=False``: a login that
        may not change the schema) refuse to run on a schema older than the code."""
        self._pool = await create_pool(self.url, self.config)
        try:
            async with self.pool.acquire() as conn:
                if self._migrate:
                    await apply_migrations(conn)
                else:
                    await check_schema(conn)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None



ABORT_AFTER_FAILED_PROBES = 2
"""Failed probes in a row after which the statements in flight are failed: an outage
confirmed, not one probe that timed out while this process's event loop was busy."""


class DatabaseWatch:
    """Probes the database periodically and reports each change of reachability.

    A node whose service needs PostgreSQL tells its callers through gRPC health
    (NOT_SERVING while the database is unreachable), so load balancers, the
    gateway's ``/health`` and ``federation status`` see the outage; meanwhile its
    pool fails fast (:attr:`BoundedPool.known_unreachable`), so callers get 503 at
    once instead of after the timeouts. When the next probe fails too, the
    statements already waiting on the server are failed as well
    (:meth:`BoundedPool.abort_connections`): a request caught by a stalled server or
    a cut link gets its 503 within two probes, not the command timeout. One failed
    probe is not enough for that: a probe also times out when this process's own
    event loop stalls, and aborting then would fail commits on a healthy server. It
    comes back by itself: the first probe that succeeds reopens the pool, which
    reconnects on its next acquire.

    The probe has a connection of its own, outside the pool: a pool saturated by
    load must not look like an outage. ``start()``/``stop()`` run it periodically.

    It asks for a *writable* server: after a failover (a standby promoted, the DSN
    listing both hosts with ``target_session_attrs=read-write``) a connection to a
    server that is, or became, a standby counts as unreachable and is dropped, so
    the next probe reconnects through the DSN to whichever host is now the primary.
    """

    def __init__(
        self, url: str, config: DatabaseConfig, pool: BoundedPool,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._url = url
        self._config = config
        self._pool = pool
        self._on_change = on_change
        self._connection: asyncpg.Connection | None = None
        self.reachable = True
        self._failed_probes = 0
        """Failed probes in a row; the second aborts the pool's connections."""
        self._task = PeriodicTask("database-watch", config.probe_interval_seconds, self.check)

    @classmethod
    def of(cls, database: Database, on_change: Callable[[bool], Awaitable[None]] | None = None
           ) -> DatabaseWatch:
        return cls(database.url, database.config, database.pool, on_change)

    async def start(self) -> None:
        await self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
        self._drop_connection()

    async def check(self) -> None:
        reachable = await self._probe()
        self._failed_probes = 0 if reachable else self._failed_probes + 1
        if self._failed_probes == ABORT_AFTER_FAILED_PROBES:
            log.warning("database still unreachable: failing the statements waiting on it")
            self._pool.abort_connections()
        if reachable == self.reachable:
            return
        self.reachable = reachable
        self._pool.known_unreachable = not reachable
        if reachable:
            log.info("database reachable again")
        else:
            log.warning("database unreachable: failing fast until it returns")
        if self._on_change is not None:
            await self._on_change(reachable)

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(self._config.probe_timeout_seconds):
                if self._connection is None or self._connection.is_closed():
                    self._connection = await asyncpg.connect(self._url)
                if await self._connection.fetchval("SELECT pg_is_in_recovery()"):
                    raise DatabaseUnreachable("connected to a standby (read-only)")
        except Exception as exc:  # any failure means "not now"
            log.debug("database probe failed", extra={"error": str(exc)[:200]})
            self._drop_connection()
            return False
        return True

    def _drop_connection(self) -> None:
        if self._connection is not None:
            # terminate(), not close(): close() waits for a server that may be stalled.
            self._connection.terminate()
            self._connection = None


async def ensure_database(admin_url: str, name: str) -> None:
    """Create database ``name`` through a connection to ``admin_url`` unless it exists."""
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def embedded_data_dir(home: Path) -> Path:
    """Where the home's embedded cluster is: the data itself, or (when PostgreSQL's system
    user cannot reach the home, see ``federation.db.embedded``) a symbolic link to it
    under ``/var/lib/federation``. ``.resolve()`` gives the real place either way."""
    return home / "postgres" / "data"
