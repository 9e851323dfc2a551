"""PostgreSQL access: one asyncpg pool per process, migrated at start.

Every pool is built by :func:`create_pool`, so every wait on the database is
bounded by configuration: connecting (``connect_timeout_seconds``), waiting for
a pooled connection (``acquire_timeout_seconds``, applied to every
``acquire()``, including the implicit one of ``pool.fetch*``) and each
statement (``command_timeout_seconds``). When PostgreSQL is gone or stalled, a
caller gets an error within those bounds, which :mod:`federation.db.errors`
turns into UNAVAILABLE with a retry hint, instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from federation.config import DatabaseConfig
from federation.db.migrate import apply_migrations
from federation.periodic import PeriodicTask

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    pass


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose ``acquire()`` waits at most the configured time.

    asyncpg's own default is to wait for ever, and ``pool.fetchrow`` and friends
    call ``acquire()`` without a timeout: while PostgreSQL is stalled, every
    request would queue behind the pool with no bound.
    """

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


async def create_pool(
    url: str,
    config: DatabaseConfig,
    *,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> asyncpg.Pool:
    """A started :class:`BoundedPool`; :class:`DatabaseUnavailable` if PostgreSQL is not there."""
    pool = BoundedPool(
        url,
        acquire_timeout=config.acquire_timeout_seconds,
        min_size=config.pool_min_size if min_size is None else min_size,
        max_size=config.pool_max_size if max_size is None else max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        command_timeout=config.command_timeout_seconds,
        timeout=config.connect_timeout_seconds,
        init=init,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
    )
    try:
        await pool
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        await pool.close()
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    return pool


class Database:
    """The process's connection pool. ``await start()`` before use, ``await stop()`` after."""

    def __init__(self, url: str, config: DatabaseConfig, *, migrate: bool = True) -> None:
        if not url:
            raise ValueError("a database URL is required")
        self.url = url
        self.config = config
        self._migrate = migrate
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Database.start() has not been awaited")
        return self._pool

    async def start(self) -> None:
        self._pool = await create_pool(self.url, self.config)
        if self._migrate:
            async with self.pool.acquire() as conn:
                await apply_migrations(conn)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def reachable(self) -> bool:
        """One ``SELECT 1`` within the probe timeout: is PostgreSQL answering now?"""
        return await probe(self.pool, self.config.probe_timeout_seconds)


async def probe(pool: asyncpg.Pool, deadline_seconds: float) -> bool:
    """Whether ``pool`` can run ``SELECT 1`` within ``deadline_seconds`` (acquire included)."""
    try:
        async with asyncio.timeout(deadline_seconds):
            await pool.fetchval("SELECT 1")
    except Exception as exc:  # any failure means "not now"; the reason is logged
        log.debug("database probe failed", extra={"error": str(exc)[:200]})
        return False
    return True


class DatabaseWatch:
    """Probes the database periodically and reports each change of reachability.

    A node whose service needs PostgreSQL tells its callers through gRPC health
    (NOT_SERVING while the database is unreachable), so load balancers, the
    gateway's ``/health`` and ``federation status`` see the outage, and it comes
    back by itself: the pool reconnects on the next acquire once PostgreSQL does.
    ``start()`` and ``stop()`` are those of the underlying :class:`PeriodicTask`.
    """

    def __init__(
        self, database: Database, on_change: Callable[[bool], Awaitable[None]]
    ) -> None:
        self._database = database
        self._on_change = on_change
        self.reachable = True
        task = PeriodicTask("database-watch", database.config.probe_interval_seconds, self.check)
        self.start, self.stop = task.start, task.stop

    async def check(self) -> None:
        reachable = await self._database.reachable()
        if reachable == self.reachable:
            return
        self.reachable = reachable
        if reachable:
            log.info("database reachable again")
        else:
            log.warning("database unreachable: serving NOT_SERVING until it returns")
        await self._on_change(reachable)


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
    return home / "postgres" / "data"
