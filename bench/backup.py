"""Backup and restore of a database of a realistic size (issue #16).

``.venv/bin/python -m bench.backup [--records N]``: a scratch embedded PostgreSQL gets a
federation schema and N audit records shaped like the gateway's (a valid hash chain,
eight attributes each; one million by default, about 0.6 GB with indexes), then:

* ``federation backup`` (``pg_dump -Fc`` from an exported snapshot, plus checksums);
* ``federation restore --scratch`` (checks, ``pg_restore`` into a new cluster, the
  chain walk of every record);
* for comparison, ``pg_basebackup`` (tar, WAL streamed) of the same cluster.

Prints seconds and sizes; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from federation.db.embedded import EmbeddedPostgres, installed_wheel_bin
from federation.db.migrate import apply_migrations
from federation.memory.records import GENESIS_HASH, chain_hash
from federation.memory.writer import COLUMNS

_BATCH = 20_000


async def fill(url: str, records: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        prev, start = GENESIS_HASH, dt.datetime.now(dt.UTC)
        for first in range(1, records + 1, _BATCH):
            rows = []
            for sequence in range(first, min(first + _BATCH, records + 1)):
                at = start + dt.timedelta(milliseconds=sequence)
                attributes = {"request_id": f"req-{sequence:012d}", "model": "test-model",
                              "status": "200", "prompt_tokens": "31",
                              "completion_tokens": "64", "latency_ms": "412",
                              "key_id": "AbCdEfGhIjKlMnOp", "route": "inference-1"}
                digest = chain_hash(prev, sequence=sequence, tenant_id="acme",
                                    actor="spiffe://federation.local/node/local/gateway",
                                    action="gateway.request", subject="chat.completions",
                                    request_id=attributes["request_id"], created_at=at,
                                    attributes=attributes, body=b"")
                rows.append((sequence, "acme", "spiffe://federation.local/node/local/gateway",
                             "gateway.request", "chat.completions", attributes["request_id"],
                             at, json.dumps(attributes, sort_keys=True), b"", prev, digest,
                             100, False))
                prev = digest
            await conn.copy_records_to_table("memory_records", records=rows, columns=COLUMNS)
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        print(f"database: {records:,} audit records, {size / 1e9:.2f} GB")
    finally:
        await conn.close()


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    server = EmbeddedPostgres(work / "postgres" / "data")
    dsn = server.start()
    try:
        url = dsn.url("postgres")
        started = time.monotonic()
        asyncio.run(fill(url, args.records))
        print(f"fill: {time.monotonic() - started:.1f}s")
        home = work / "home"
        home.mkdir()
        env = dict(os.environ, FEDERATION_HOME=str(home), FEDERATION_DATABASE_URL=url)
        cli = [sys.executable, "-m", "federation.cli"]
        seconds = timed([*cli, "backup", "--out", str(work / "backup")], env)
        dump = (work / "backup" / "database.dump").stat().st_size
        print(f"federation backup (pg_dump -Fc + SHA-256): {seconds:.1f}s, dump "
              f"{dump / 1e6:.0f} MB")
        env.pop("FEDERATION_DATABASE_URL")
        seconds = timed([*cli, "restore", "--scratch", str(work / "backup")], env)
        print(f"federation restore --scratch (checks, pg_restore, chain walk): {seconds:.1f}s")
        base_env = dict(os.environ, PGPASSWORD=dsn.password)
        seconds = timed([str(installed_wheel_bin() / "pg_basebackup"), "-h", dsn.host,
                         "-p", str(dsn.port), "-U", "postgres", "-D", str(work / "base"),
                         "-Ft", "-X", "stream", "--checkpoint=fast", "--no-password"], base_env)
        size = sum(p.stat().st_size for p in (work / "base").iterdir())
        print(f"pg_basebackup -Ft -X stream: {seconds:.1f}s, {size / 1e6:.0f} MB")
    finally:
        server.stop()
        server.delete_cluster()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
