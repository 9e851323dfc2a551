"""The database watch against a real PostgreSQL: one failed probe makes the pool fail
fast for new work but leaves the statements in flight alone (a probe also times out
when this process's own event loop stalls); a second failed probe in a row fails them
too, so a request caught by a stalled server is not left waiting for its statement
timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from federation.config import DatabaseConfig
from federation.db import (
    ABORT_AFTER_FAILED_PROBES,
    BoundedPool,
    DatabaseUnreachable,
    DatabaseWatch,
    create_pool,
)
from federation.db.errors import is_outage
from tests.nodes_support import free_port

CONFIG = DatabaseConfig(probe_timeout_seconds=0.3)


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[BoundedPool]:
    pool = await create_pool(pg_url, CONFIG)
    try:
        yield pool
    finally:
        pool.terminate()


async def test_a_probe_timed_out_by_a_stalled_event_loop_fails_no_statement(
        pg_url: str, pool: BoundedPool) -> None:
    watch = DatabaseWatch(pg_url, CONFIG, pool)
    await watch.check()  # connected: the next probe only needs a query
    in_flight = asyncio.create_task(pool.fetchval("SELECT 7 FROM pg_sleep(1)"))
    await asyncio.sleep(0.2)
    check = asyncio.create_task(watch.check())
    await asyncio.sleep(0)  # the probe is sent
    # The loop itself is busy past the probe timeout (on purpose: what a CPU-bound
    # stretch or a long collection does), while the server is fine.
    time.sleep(CONFIG.probe_timeout_seconds + 0.3)  # noqa: ASYNC251
    await check
    assert not watch.reachable  # new work fails fast for a moment...
    assert await in_flight == 7  # ...but the healthy server's statement completes
    await watch.check()
    assert watch.reachable
    assert await pool.fetchval("SELECT 1") == 1
    await watch.stop()


async def test_a_second_failed_probe_fails_the_statements_waiting(pool: BoundedPool) -> None:
    # The watch probes an address where nothing answers; the pool's server is fine, so
    # only the watch can end the statement before its five seconds.
    watch = DatabaseWatch(f"postgresql://nobody@127.0.0.1:{free_port()}/none", CONFIG, pool)
    in_flight = asyncio.create_task(pool.fetchval("SELECT pg_sleep(5)"))
    await asyncio.sleep(0.2)
    for _ in range(ABORT_AFTER_FAILED_PROBES - 1):
        await watch.check()
    assert not in_flight.done()
    with pytest.raises(DatabaseUnreachable):
        pool.acquire()
    started = time.monotonic()
    await watch.check()
    with pytest.raises(asyncpg.PostgresConnectionError) as closed:  # closed under it
        await in_flight
    assert is_outage(closed.value)  # answered as 503, like any outage
    assert time.monotonic() - started < 1.0
    await watch.stop()
