"""Thermal memory against a real PostgreSQL: chain, immutability, tamper detection, tiers."""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import replace

import asyncpg
import pytest

from federation.config import DatabaseConfig, MemoryConfig
from federation.db import Database
from federation.errors import FederationError
from federation.logs import request_id_var
from federation.memory import AuditEntry, Tier, tier_for
from federation.memory.records import GENESIS_HASH
from federation.memory.store import MemoryStore, SearchQuery


def entry(n: int, tenant: str = "t1", body: bytes = b"") -> AuditEntry:
    return AuditEntry(actor="keys", action="key.issue", tenant_id=tenant, subject=f"k{n}",
                      attributes={"n": str(n)}, body=body)


async def tamper(url: str, sql: str, *args: object) -> None:
    """Run ``sql`` as the superuser with triggers bypassed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def test_records_form_a_gapless_verifiable_chain(store: MemoryStore) -> None:
    records = await asyncio.gather(*(store.record(entry(i)) for i in range(300)))
    assert sorted(r.sequence for r in records) == list(range(1, 301))
    by_seq = {r.sequence: r for r in records}
    assert by_seq[1].prev_hash == GENESIS_HASH
    assert all(by_seq[s].prev_hash == by_seq[s - 1].hash for s in range(2, 301))
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 300 and report.first_bad_sequence is None


async def test_two_processes_share_one_chain(store: MemoryStore, pg_url: str) -> None:
    other_db = Database(pg_url, DatabaseConfig(pool_min_size=1, pool_max_size=4))
    await other_db.start()
    other = MemoryStore(other_db.pool, MemoryConfig())
    await other.start()
    try:
        await asyncio.gather(*(s.record(entry(i)) for i in range(100) for s in (store, other)))
    finally:
        await other.stop()
        await other_db.stop()
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 200


async def test_request_id_comes_from_the_call_being_served(store: MemoryStore) -> None:
    token = request_id_var.set("req_abc")
    try:
        record = await store.record(entry(1))
    finally:
        request_id_var.reset(token)
    assert record.request_id == "req_abc"
    assert [r.sequence for r in await store.trail("req_abc")] == [record.sequence]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE memory_records SET action = 'key.forged' WHERE sequence = 1",
        "UPDATE memory_records SET body = 'x'::bytea WHERE sequence = 1",
        "DELETE FROM memory_records WHERE sequence = 1",
        "TRUNCATE memory_records",
    ],
)
async def test_database_refuses_changes_to_records(
    store: MemoryStore, database: Database, statement: str
) -> None:
    await store.record(entry(1))
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await database.pool.execute(statement)


async def test_temperature_may_change(store: MemoryStore, database: Database) -> None:
    record = await store.record(entry(1))
    await database.pool.execute("UPDATE memory_records SET temperature = 3 WHERE sequence = 1")
    assert (await store.verify_chain()).intact
    assert record.temperature == 100


async def test_verify_finds_an_edited_row(
    store: MemoryStore, pg_url: str
) -> None:
    for i in range(30):
        await store.record(entry(i))
    await tamper(pg_url, "UPDATE memory_records SET subject = 'forged' WHERE sequence = 17")
    report = await store.verify_chain()
    assert not report.intact
    assert report.first_bad_sequence == 17
    assert "altered" in report.problem


async def test_verify_finds_a_rehashed_row_by_its_successor(
    store: MemoryStore, pg_url: str
) -> None:
    records = [await store.record(entry(i)) for i in range(5)]
    forged = records[2]
    attributes = json.dumps({"n": "forged"})
    new_hash = replace(forged, attributes={"n": "forged"}).computed_hash()
    await tamper(pg_url, "UPDATE memory_records SET attributes = $1::jsonb, hash = $2 "
                 "WHERE sequence = 3", attributes, new_hash)
    report = await store.verify_chain()
    assert (report.first_bad_sequence, report.problem) == (4, "record 4 does not link to record 3")


async def test_verify_finds_a_deleted_row(store: MemoryStore, pg_url: str) -> None:
    for i in range(10):
        await store.record(entry(i))
    await tamper(pg_url, "DELETE FROM memory_records WHERE sequence = 6")
    report = await store.verify_chain()
    assert (report.first_bad_sequence, report.problem) == (6, "record 6 is missing")
    partial = await store.verify_chain(from_sequence=7)
    assert partial.first_bad_sequence == 6


async def test_reads_warm_decay_cools_and_cold_bodies_compress(
    store: MemoryStore, database: Database, pg_url: str
) -> None:
    body = b"the same words again " * 50
    record = await store.record(entry(1, body=body))
    assert record.tier is Tier.HOT
    await store.cool(degrees=75)
    compressed = await database.pool.fetchrow("SELECT * FROM memory_records WHERE sequence = 1")
    assert compressed["temperature"] == 25 and compressed["compressed"]
    assert len(compressed["body"]) < len(body)
    assert (await store.verify_chain()).intact

    warmed = await store.read("t1", 1)
    assert (warmed.temperature, warmed.tier, warmed.body) == (50, Tier.WARM, body)
    assert not warmed.compressed
    await store.cool(degrees=200)
    assert (await store.read("t1", 1)).temperature == 25  # ember (0) + one read; never deleted

    await store.cool(degrees=100)
    await tamper(pg_url, "UPDATE memory_records SET body = $1 WHERE sequence = 1",
                 zlib.compress(b"rewritten"))
    assert (await store.verify_chain()).first_bad_sequence == 1


async def test_reads_and_searches_are_tenant_scoped(store: MemoryStore) -> None:
    mine = await store.record(entry(1, tenant="t1"))
    await store.record(entry(2, tenant="t2"))
    with pytest.raises(FederationError) as refused:
        await store.read("t2", mine.sequence)
    assert refused.value.code.name == "NOT_FOUND"
    page = await store.search(SearchQuery(tenant_id="t2"))
    assert [r.tenant_id for r in page.records] == ["t2"]
    everything = await store.search(SearchQuery(tenant_id=None))
    assert len(everything.records) == 2


async def test_search_pages_newest_first(store: MemoryStore) -> None:
    for i in range(7):
        await store.record(entry(i))
    seen: list[int] = []
    token = ""
    while True:
        page = await store.search(SearchQuery(tenant_id="t1", page_size=3, page_token=token,
                                              action_prefix="key.", tier=Tier.HOT))
        seen += [r.sequence for r in page.records]
        token = page.next_page_token
        if not token:
            break
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_tiers_match_the_roadmap() -> None:
    assert [tier_for(t) for t in (100, 70, 69, 40, 39, 5, 4, 0)] == [
        Tier.HOT, Tier.HOT, Tier.WARM, Tier.WARM, Tier.COLD, Tier.COLD, Tier.EMBER, Tier.EMBER,
    ]
