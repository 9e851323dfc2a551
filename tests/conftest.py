"""Shared fixtures: a real embedded PostgreSQL for the whole run, a fresh database per test.

Set FEDERATION_TEST_DATABASE_URL to run the suite against an external cluster
(a superuser DSN; each test still gets its own database).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from federation.config import EdgeConfig, MemoryConfig
from federation.db import Database
from federation.db.embedded import OWNED_ROOT, EmbeddedPostgres
from federation.db.postmaster import PostmasterPid, postmaster_alive
from federation.memory.store import MemoryStore
from tests.db_support import fresh_database_url, started_database
from tests.edge_support import FAST_EDGE, BrokerNode, broker_server
from tests.guardian_support import SwitchableSink
from tests.support import TestPKI


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


@pytest.fixture(scope="session", autouse=True)
def _remove_clusters_of_dead_sessions(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Relocated clusters of test runs that died before their teardown (a crash): their
    link under pytest's directory is gone and no server runs on them."""
    pytest_root = tmp_path_factory.getbasetemp().parent
    for note in OWNED_ROOT.glob("*/HOME"):
        link = Path(note.read_text().splitlines()[0])
        if not link.is_relative_to(pytest_root) or link.is_symlink():
            continue
        info = PostmasterPid.read(note.parent / "data")
        if info is None or not postmaster_alive(info):
            shutil.rmtree(note.parent, ignore_errors=True)


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


@pytest.fixture
def pki(home: Path) -> TestPKI:
    """A federation CA in the test's home."""
    return TestPKI(home)


@pytest.fixture
def broker_config() -> EdgeConfig:
    """The edge settings of ``broker_node`` (a test module may override this fixture)."""
    return FAST_EDGE


@pytest.fixture
async def broker_node(pki: TestPKI, database: Database, home: Path,
                      broker_config: EdgeConfig) -> AsyncIterator[BrokerNode]:
    """A broker and its enrollment port serving for the whole test (``broker_server``)."""
    async with broker_server(pki, database, home, broker_config) as (server, broker, _):
        yield server, broker


@pytest.fixture
def sink(store: MemoryStore) -> SwitchableSink:
    """Thermal memory as the guardian's audit sink, which a test can switch off."""
    return SwitchableSink(store)
