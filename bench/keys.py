"""Benchmark: key verifications/s on the hot path and thermal-memory records/s.

Run: ``python -m bench.keys`` (starts a throw-away embedded PostgreSQL), or
``FEDERATION_TEST_DATABASE_URL=postgresql://… python -m bench.keys`` for an
existing cluster (a superuser DSN; a scratch database is created and dropped).

Figures printed:
* verify: ``KeyAuthority.verify`` of one known key, in process (domain call,
  no gRPC), cache warm; uses are flushed in the background as in production.
* audit: ``MemoryStore.record`` with N concurrent writers (batched chain appends,
  each awaiting its own commit), then the same chain verified.
* baseline: a bare asyncpg loop of single-row INSERTs (one commit each) into a
  plain table, with the same concurrency, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

from federation.config import DatabaseConfig, KeysConfig, MemoryConfig
from federation.db import Database
from federation.db.embedded import EmbeddedPostgres
from federation.keys.authority import KeyAuthority
from federation.keys.models import IssueRequest
from federation.memory.records import AuditEntry
from federation.memory.store import MemoryStore


async def bench_verify(authority: KeyAuthority, secret: str, seconds: float) -> float:
    await authority.verify(secret, "bench", "chat")  # warm the cache
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            await authority.verify(secret, "bench", "chat")
        count += 1000
    return count / (time.perf_counter() - started)


async def bench_audit(store: MemoryStore, writers: int, per_writer: int) -> float:
    async def writer(n: int) -> None:
        for i in range(per_writer):
            await store.record(AuditEntry(actor="bench", action="bench.write", tenant_id="t",
                                          subject=f"{n}-{i}", attributes={"i": str(i)}))

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    return writers * per_writer / (time.perf_counter() - started)


async def bench_baseline(pool: asyncpg.Pool, writers: int, per_writer: int) -> float:
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_baseline (id bigserial PRIMARY KEY, "
                       "actor text, action text, subject text)")

    async def writer(n: int) -> None:
        for i in range(per_writer):
            await pool.execute("INSERT INTO bench_baseline (actor, action, subject) "
                               "VALUES ($1, $2, $3)", "bench", "bench.write", f"{n}-{i}")

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    return writers * per_writer / (time.perf_counter() - started)


async def run(admin_url: str, args: argparse.Namespace) -> None:
    name = "bench_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db = Database(admin_url.rpartition("/")[0] + "/" + name,
                  DatabaseConfig(pool_min_size=4, pool_max_size=20))
    await db.start()
    store = MemoryStore(db.pool, MemoryConfig())
    await store.start()
    authority = KeyAuthority(db.pool, KeysConfig(), store)
    await authority.start()
    try:
        issued = await authority.issue(IssueRequest("bench", ["chat"]), actor="bench")
        verify_rate = await bench_verify(authority, issued.secret, args.seconds)
        print(f"verify (in-process, cached key):  {verify_rate:>10,.0f} verifications/s")
        audit_rate = await bench_audit(store, args.writers, args.records // args.writers)
        print(f"audit ({args.writers} concurrent writers):    {audit_rate:>10,.0f} records/s")
        base_rate = await bench_baseline(db.pool, args.writers, args.records // args.writers)
        print(f"baseline bare INSERT ({args.writers} writers):  {base_rate:>10,.0f} rows/s")
        started = time.perf_counter()
        report = await store.verify_chain()
        elapsed = time.perf_counter() - started
        print(f"verify_chain: {report.records_checked:,} records in {elapsed:.2f}s "
              f"({report.records_checked / elapsed:,.0f}/s), intact={report.intact}")
    finally:
        await authority.stop()
        await store.stop()
        await db.stop()
        admin = await asyncpg.connect(admin_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="verify benchmark duration")
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    external = os.environ.get("FEDERATION_TEST_DATABASE_URL")
    if external:
        asyncio.run(run(external, args))
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "data")
        dsn = server.start()
        try:
            asyncio.run(run(dsn.url("postgres"), args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
