"""Pooled connections are not reset on release (our code leaves no session state), an
open transaction is still rolled back, and a session advisory lock never goes back to
the pool held: against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from federation.config import DatabaseConfig
from federation.db import BoundedPool, create_pool, session_advisory_lock

KEY = 0x46454452_54455354  # "FEDRTEST"


@pytest.fixture
async def logged_pool(pg_url: str) -> AsyncIterator[tuple[BoundedPool, list[str]]]:
    """A one-connection pool and every statement its connection sends."""
    sent: list[str] = []

    async def attach(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: sent.append(logged.query.strip()))

    pool = await create_pool(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=1),
                             init=attach)
    try:
        yield pool, sent
    finally:
        await pool.close()


async def test_a_released_connection_costs_no_reset_statement(
        logged_pool: tuple[BoundedPool, list[str]]) -> None:
    pool, sent = logged_pool
    for _ in range(3):
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
    assert sent == ["SELECT 1"] * 3  # asyncpg's default would add a reset per release


async def test_an_open_transaction_is_still_rolled_back_on_release(
        logged_pool: tuple[BoundedPool, list[str]]) -> None:
    pool, _ = logged_pool
    async with pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TABLE left_open (n int)")
    async with pool.acquire() as conn:  # the same, only, connection
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('left_open')") is None


async def test_a_session_lock_is_released_with_its_block(pg_url: str) -> None:
    pool = await create_pool(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=1))
    other = await asyncpg.connect(pg_url)
    try:
        async with pool.acquire() as conn, session_advisory_lock(conn, KEY) as held:
            assert held
            assert not await other.fetchval("SELECT pg_try_advisory_lock($1)", KEY)
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", KEY)
        async with pool.acquire() as conn, session_advisory_lock(conn, KEY) as held:
            assert not held  # the other session has it now
    finally:
        await other.close()
        await pool.close()


async def test_a_session_lock_that_cannot_be_unlocked_ends_its_session(pg_url: str) -> None:
    pool = await create_pool(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=1))
    entered = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire() as conn, session_advisory_lock(conn, KEY):
            entered.set()
            await asyncio.sleep(60)

    other = await asyncpg.connect(pg_url)
    try:
        holder = asyncio.create_task(hold())
        await entered.wait()
        holder.cancel()  # leaves the block: the unlock starts ...
        await asyncio.sleep(0)
        holder.cancel()  # ... and is cancelled too
        with pytest.raises(asyncio.CancelledError):
            await holder
        async with asyncio.timeout(10):  # the session ended, and the lock with it
            while not await other.fetchval("SELECT pg_try_advisory_lock($1)", KEY):  # noqa: ASYNC110 - PostgreSQL has no event
                await asyncio.sleep(0.05)
    finally:
        await other.close()
        await pool.close()
