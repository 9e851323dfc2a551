"""Fresh databases on the test cluster: one per test (conftest) or per module; and a
cluster of a test's own, for the tests that kill or stall PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from federation.config import DatabaseConfig
from federation.db import Database, ensure_database
from federation.db.embedded import EmbeddedPostgres


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` instead, its options kept."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.asynccontextmanager
async def fresh_database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """DSN of a brand-new, empty database, dropped (connections forced out) at exit."""
    name = "t_" + uuid.uuid4().hex[:12]
    await _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_admin_url, name)
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


@dataclass
class OwnCluster:
    """A PostgreSQL server only this test uses: it may be killed, stalled and restarted
    (same port, same data) while the federation under test keeps running."""

    server: EmbeddedPostgres
    url: str
    """DSN of its ``federation`` database."""

    @property
    def postmaster_pid(self) -> int:
        return int((self.server.data_dir / "postmaster.pid").read_text().split()[0])

    def processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(self.postmaster_pid)
        return [postmaster, *postmaster.children(recursive=True)]

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (and reap it: this test started it)."""
        os.kill(self.postmaster_pid, signal.SIGKILL)
        self.server.stop()

    def restart(self) -> None:
        self.server.start()

    def stall(self) -> list[psutil.Process]:
        """SIGSTOP every PostgreSQL process; the stalled ones, for :meth:`resume`."""
        stalled = self.processes()
        for process in stalled:
            process.send_signal(signal.SIGSTOP)
        return stalled

    @staticmethod
    def resume(stalled: list[psutil.Process]) -> None:
        for process in stalled:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def own_cluster(data_dir: Path) -> Iterator[OwnCluster]:
    """Start a cluster with a ``federation`` database; stop and delete it at exit (also
    where it was relocated for the system user)."""
    server = EmbeddedPostgres(data_dir, port=_free_port())
    dsn = server.start()
    cluster = OwnCluster(server, dsn.url())
    try:
        asyncio.run(ensure_database(dsn.url("postgres"), "federation"))
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.resume(cluster.processes())
        server.stop()
        server.delete_cluster()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
