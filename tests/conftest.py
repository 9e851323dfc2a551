"""Shared fixtures: a real embedded PostgreSQL for the whole run, a fresh database per test.

Set FEDERATION_TEST_DATABASE_URL to run the suite against an external cluster
(a superuser DSN; each test still gets its own database).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from federation.config import MemoryConfig
from federation.db import Database
from federation.db.embedded import EmbeddedPostgres
from federation.memory.store import MemoryStore
from tests.db_support import fresh_database_url, started_database


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Superuser DSN of the PostgreSQL cluster shared by the whole test run."""
    external = os.environ.get("FEDERATION_TEST_DATABASE_URL")
    if external:
        yield external
        return
    # As root, pytest's private /tmp/pytest-of-root makes the data live under
    # /var/lib/federation (see federation.db.embedded): delete it with the run.
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield server.start().url("postgres")
    finally:
        server.stop()
        server.delete_cluster()


@pytest.fixture
async def pg_url(pg_admin_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped after the test."""
    async with fresh_database_url(pg_admin_url) as url:
        yield url


@pytest.fixture
async def database(pg_url: str) -> AsyncIterator[Database]:
    """A started, migrated :class:`Database` on a fresh database."""
    async with started_database(pg_url) as db:
        yield db


@pytest.fixture
async def store(database: Database) -> AsyncIterator[MemoryStore]:
    """Thermal memory (the chain writer started) on the test's database."""
    memory = MemoryStore(database.pool, MemoryConfig())
    await memory.start()
    try:
        yield memory
    finally:
        await memory.stop()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty federation home."""
    path = tmp_path / "home"
    path.mkdir()
    return path
