"""Runbook drill: database failover (docs/runbooks/database-failover.md).

Two PostgreSQL servers from the wheel: a primary, and a standby made from it with
``pg_basebackup -R`` streaming with synchronous replication (a commit returns once
the standby has the WAL). ``federation up`` uses both through one DSN with
``target_session_attrs=read-write``. While clients chat, the primary is SIGKILLed:
clients get 503 (never 500); ``federation db promote`` promotes the standby; the
federation serves again with no process restarted, every answered request has its
audit record on the new primary and the chain verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from federation.db import ensure_database
from federation.db.embedded import EmbeddedDsn, EmbeddedPostgres
from federation.db.errors import outage_error
from tests.chaos.test_database_outages import chatting, check_nothing_lost, node_pids
from tests.up_support import federation_up, until

RECOVERED_WITHIN = 30.0


@dataclass
class Pair:
    primary: EmbeddedPostgres
    primary_dsn: EmbeddedDsn
    standby: EmbeddedPostgres
    standby_dsn: EmbeddedDsn

    @property
    def url(self) -> str:
        """Both hosts, the writable one chosen at each connection."""
        password = self.primary_dsn.password
        return (f"postgresql://postgres:{password}@{self.primary_dsn.host}:"
                f"{self.primary_dsn.port},{self.standby_dsn.host}:{self.standby_dsn.port}"
                "/federation?target_session_attrs=read-write")

    def kill_primary(self) -> None:
        pid = int((self.primary.data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        self.primary.stop()  # reaps it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _sql(url: str, *statements: str) -> list[object]:
    conn = await asyncpg.connect(url)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    primary = EmbeddedPostgres(tmp_path / "primary" / "data", port=_free_port())
    standby = EmbeddedPostgres(tmp_path / "standby" / "data", port=_free_port())
    try:
        primary_dsn = primary.start()
        asyncio.run(ensure_database(primary_dsn.url("postgres"), "federation"))
        # Synchronous: a commit waits until a standby has flushed its WAL.
        asyncio.run(_sql(primary_dsn.url(), "ALTER SYSTEM SET synchronous_standby_names = '*'",
                         "SELECT pg_reload_conf()"))
        standby_dsn = standby.prepare_standby(primary_dsn)
        standby.start()
        running = Pair(primary, primary_dsn, standby, standby_dsn)
        asyncio.run(_until_sync(primary_dsn.url()))
        yield running
    finally:
        for server in (standby, primary):
            server.stop()
            server.delete_cluster()


async def _until_sync(url: str) -> None:
    deadline = time.monotonic() + 30
    while (await _sql(url, "SELECT string_agg(sync_state, ',') FROM pg_stat_replication"))[0] \
            != "sync":
        assert time.monotonic() < deadline, "the standby never became synchronous"
        await asyncio.sleep(0.2)


async def test_the_standby_is_refused_for_writes_as_an_outage(pair: Pair) -> None:
    """Before a promotion, a read-write DSN naming only standbys is an outage (503),
    not an internal error."""
    only_standby = pair.standby_dsn.url() + "?target_session_attrs=read-write"
    with pytest.raises(Exception) as refused:
        await asyncpg.connect(only_standby)
    outage = outage_error(refused.value)
    assert outage is not None and outage.spec.http_status == 503, refused.value


async def test_primary_killed_standby_promoted_nothing_committed_is_lost(
        tmp_path: Path, pair: Pair) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log",
                             extra_env={"FEDERATION_DATABASE_URL": pair.url}) as up:
        code, out, err = await up.cli("db", "status", "--json")
        assert code == 0, out + err
        assert [s["role"] for s in json.loads(out)] == ["primary", "standby"]
        pids = node_pids(up)
        async with chatting(up) as loops:
            await asyncio.to_thread(pair.kill_primary)
            killed_at = time.monotonic()
            await until(lambda: all(any(at > killed_at and status == 503
                                        for at, status, _ in loop.outcomes)
                                    for loop in loops), 15)

            code, out, err = await up.cli("db", "promote")
            assert code == 0, out + err
            assert "promoted" in out
            promoted_at = time.monotonic()
            recovered = await until(lambda: all(loop.ok_since(promoted_at) for loop in loops),
                                    RECOVERED_WITHIN)
        await check_nothing_lost(up, loops, pids)
        # Each component checks its database once a second: /health can trail the first
        # answers after the promotion by a moment (as in the multi-host drill).
        deadline = time.monotonic() + 10
        status, body = await up.health()
        while status != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            status, body = await up.health()
        assert status == 200, body
        code, out, err = await up.cli("db", "status")
        assert code == 0 and "unreachable" in out and "1 primary among 2 hosts" in out, out + err
    print(f"\nserving again {recovered:.1f}s after the promotion")

