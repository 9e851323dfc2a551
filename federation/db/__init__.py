"""PostgreSQL access: one asyncpg pool per process, migrated at start."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

from federation.config import DatabaseConfig
from federation.db.migrate import apply_migrations

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    pass


class Database:
    """The process's connection pool. ``await start()`` before use, ``await stop()`` after."""

    def __init__(self, url: str, config: DatabaseConfig, *, migrate: bool = True) -> None:
        if not url:
            raise ValueError("a database URL is required")
        self.url = url
        self._config = config
        self._migrate = migrate
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Database.start() has not been awaited")
        return self._pool

    async def start(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self._config.pool_min_size,
                max_size=self._config.pool_max_size,
                command_timeout=self._config.command_timeout_seconds,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        if self._migrate:
            async with self.pool.acquire() as conn:
                await apply_migrations(conn)

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


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
