"""Fresh databases on the test cluster: one per test (conftest) or per module."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

from federation.config import DatabaseConfig
from federation.db import Database


@contextlib.asynccontextmanager
async def fresh_database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped (connections forced out) at exit."""
    name = "t_" + uuid.uuid4().hex[:12]
    await _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_admin_url.rpartition('/')[0]}/{name}"
    finally:
        await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def started_database(url: str) -> AsyncIterator[Database]:
    """A started, migrated :class:`Database` on ``url``, stopped at exit."""
    db = Database(url, DatabaseConfig(pool_min_size=1, pool_max_size=20))
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


@contextlib.asynccontextmanager
async def scratch_database(pg_admin_url: str) -> AsyncIterator[Database]:
    """Both at once, for fixtures wider than one test."""
    async with fresh_database_url(pg_admin_url) as url, started_database(url) as db:
        yield db


async def _admin(pg_admin_url: str, statement: str) -> None:
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()
