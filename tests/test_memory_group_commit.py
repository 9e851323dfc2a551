"""The chain writer's group commit against a real PostgreSQL: one statement per batch on
a head kept in memory, and a chain that stays one valid chain whatever happens under the
writer (a failed batch, a lost connection, another writer, records gone after a failover)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from federation.config import DatabaseConfig, MemoryConfig
from federation.db import BoundedPool, Database, create_pool
from federation.errors import ErrorCode, FederationError
from federation.memory import AuditEntry
from federation.memory.store import MemoryStore
from federation.memory.writer import _INSERT_LINKED
from tests.db_support import database_name


def entry(n: int, actor: str = "keys") -> AuditEntry:
    return AuditEntry(actor=actor, action="key.issue", tenant_id="t1", subject=f"k{n}",
                      attributes={"n": str(n)})


class Statements:
    """Every statement the pool's connections send (asyncpg's query logger)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def attach(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: self.sent.append(logged.query.strip()))


@pytest.fixture
async def logged(database: Database, pg_url: str) -> AsyncIterator[tuple[BoundedPool, Statements]]:
    """A pool (on the migrated test database) whose statements are recorded."""
    statements = Statements()
    pool = await create_pool(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=4),
                             init=statements.attach)
    try:
        yield pool, statements
    finally:
        await pool.close()


@pytest.fixture
async def other(pg_url: str) -> AsyncIterator[MemoryStore]:
    """A second memory process's store on the same database."""
    database = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=4))
    await database.start()
    store = MemoryStore(database.pool, MemoryConfig())
    await store.start()
    try:
        yield store
    finally:
        await store.stop()
        await database.stop()


async def superuser_delete_after(url: str, sequence: int) -> None:
    """What a failover to a standby that missed the last commits looks like to the writer:
    the newest records are gone (only the superuser, triggers off, can do this)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("DELETE FROM memory_records WHERE sequence > $1", sequence)
    finally:
        await conn.close()


async def test_an_idle_append_and_a_crowd_of_appends_each_cost_one_statement(
        logged: tuple[BoundedPool, Statements]) -> None:
    pool, statements = logged
    store = MemoryStore(pool, MemoryConfig())
    await store.start()
    try:
        await store.record(entry(0))  # the first batch reads the head
        statements.sent.clear()
        alone = await store.record(entry(1))  # idle: written at once, alone
        assert alone.sequence == 2
        assert len(statements.sent) == 1 and statements.sent[0].startswith("INSERT"), \
            statements.sent  # no lock, no head SELECT, no transaction, no reset
        statements.sent.clear()
        crowd = await asyncio.gather(*(store.record(entry(n)) for n in range(2, 42)))
        assert [r.sequence for r in crowd] == list(range(3, 43))
        assert len(statements.sent) == 1 and statements.sent[0].startswith("INSERT"), \
            statements.sent  # forty records, one commit
        report = await store.verify_chain()
        assert report.intact and report.records_checked == 42
    finally:
        await store.stop()


async def test_a_group_is_cut_at_its_byte_bound(logged: tuple[BoundedPool, Statements]) -> None:
    # 512 records of gRPC's largest message would pass PostgreSQL's 1 GiB per parameter
    # and fail every record of the group; a group is cut at memory.max_batch_bytes.
    pool, statements = logged
    store = MemoryStore(pool, MemoryConfig(max_batch_bytes=10_000))
    await store.start()
    try:
        await store.record(entry(0))
        statements.sent.clear()
        large = [AuditEntry(actor="keys", action="key.issue", body=bytes([n]) * 4_000)
                 for n in range(6)]
        crowd = await asyncio.gather(*(store.record(e) for e in [*large, entry(6)]))
        inserts = [s for s in statements.sent if s.startswith("INSERT")]
        assert len(inserts) == 3, statements.sent  # 2 + 2 + 2 large, the small one joins
        assert [r.sequence for r in crowd] == list(range(2, 9))
        huge = await store.record(AuditEntry(actor="keys", action="key.issue",
                                             body=b"x" * 50_000))  # alone, still written
        assert huge.sequence == 9
        assert (await store.verify_chain()).intact
    finally:
        await store.stop()


async def test_a_failed_batch_fails_every_caller_and_the_next_one_links_to_the_head(
        store: MemoryStore) -> None:
    await store.record(entry(1))
    await store.record(entry(2))
    outcomes = await asyncio.gather(store.record(entry(3, actor="bad\x00actor")),
                                    store.record(entry(4)), return_exceptions=True)
    assert all(isinstance(o, FederationError) and o.code is ErrorCode.UNAVAILABLE
               for o in outcomes), outcomes  # one batch: none of it is stored
    after = await store.record(entry(5))
    assert after.sequence == 3
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 3


async def test_the_chain_goes_on_after_the_connections_are_lost(
        store: MemoryStore, pg_admin_url: str, pg_url: str) -> None:
    await store.record(entry(1))
    admin = await asyncpg.connect(pg_admin_url)
    try:
        database = database_name(pg_url)
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    finally:
        await admin.close()
    written = 1
    try:  # the pool may or may not notice before the batch meets a dead connection
        await store.record(entry(2))
        written += 1
    except FederationError as lost:
        assert lost.code is ErrorCode.UNAVAILABLE
    after = await store.record(entry(3))
    assert after.sequence == written + 1
    report = await store.verify_chain()
    assert report.intact and report.records_checked == written + 1


async def test_a_writer_links_to_what_another_writer_appended_meanwhile(
        store: MemoryStore, other: MemoryStore) -> None:
    await store.record(entry(1))
    theirs = [await other.record(entry(n)) for n in (2, 3, 4)]
    mine = await store.record(entry(5))
    assert mine.sequence == 5 and mine.prev_hash == theirs[-1].hash
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 5


async def test_records_gone_under_the_writer_are_not_skipped(
        store: MemoryStore, pg_url: str) -> None:
    records = [await store.record(entry(n)) for n in range(5)]
    await superuser_delete_after(pg_url, 3)
    after = await store.record(entry(6))
    assert after.sequence == 4 and after.prev_hash == records[2].hash  # no gap, no fork
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 4


async def test_many_writers_racing_keep_one_gapless_chain(
        store: MemoryStore, other: MemoryStore) -> None:
    await asyncio.gather(*(s.record(entry(n)) for n in range(150) for s in (store, other)))
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 300


async def test_a_writer_that_keeps_losing_the_race_answers_unavailable_then_recovers(
        database: Database, other: MemoryStore) -> None:
    impatient = MemoryStore(database.pool, MemoryConfig(append_attempts=1))
    await impatient.start()
    try:
        await impatient.record(entry(1))
        await other.record(entry(2))
        with pytest.raises(FederationError) as moved:
            await impatient.record(entry(3))  # its one attempt met the other's record
        assert moved.value.code is ErrorCode.UNAVAILABLE and "moved" in moved.value.message
        assert (await impatient.record(entry(4))).sequence == 3
    finally:
        await impatient.stop()
    assert (await other.verify_chain()).intact


@pytest.mark.parametrize("plan", ["force_generic_plan", "force_custom_plan"])
async def test_the_append_guards_are_index_lookups_however_long_the_chain(
        database: Database, pg_url: str, plan: str) -> None:
    """An append must cost the same at the millionth record as at the first: its guards
    (the head still the newest record) may not scan the table, whichever plan PostgreSQL
    picks for the prepared statement (asyncpg's become generic after five runs)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("""
            INSERT INTO memory_records (sequence, tenant_id, actor, action, subject, request_id,
                                        created_at, attributes, body, prev_hash, hash,
                                        temperature)
            SELECT n, 't1', 'keys', 'key.issue', 'k', '', now(), '{}', '',
                   sha256((n - 1)::text::bytea), sha256(n::text::bytea), 50
            FROM generate_series(1, 50000) AS n""")
        await conn.execute("ANALYZE memory_records")
        await conn.execute(f"SET plan_cache_mode = {plan}")
        await conn.execute(f"PREPARE append AS {_INSERT_LINKED}")
        no_records = ", ".join(["'{}'"] * 12)
        plan_rows = await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) EXECUTE append({no_records}, "
                                     "50000, sha256('50000'::bytea))")
    finally:
        await conn.close()
    shown = "\n".join(row[0] for row in plan_rows)
    assert "Seq Scan on memory_records" not in shown, shown
    assert "Index" in shown, shown
