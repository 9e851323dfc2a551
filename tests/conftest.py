"""Shared fixtures: a real embedded PostgreSQL for the whole run, a fresh database per test.

Set FEDERATION_TEST_DATABASE_URL to run the suite against an external cluster
(a superuser DSN; each test still gets its own database).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from federation.config import DatabaseConfig
from federation.db import Database
from federation.db.embedded import EmbeddedPostgres


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Superuser DSN of the PostgreSQL cluster shared by the whole test run."""
    external = os.environ.get("FEDERATION_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    dsn = server.start()
    try:
        yield dsn.url("postgres")
    finally:
        server.stop()


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def pg_url(pg_admin_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(pg_admin_url, name)
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database(pg_url: str) -> AsyncIterator[Database]:
    """A started, migrated :class:`Database` on a fresh database."""
    db = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=20))
    await db.start()
    try:
        yield db
    finally:
        await db.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty federation home."""
    path = tmp_path / "home"
    path.mkdir()
    return path
