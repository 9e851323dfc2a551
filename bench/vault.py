"""What the tenant vault costs: reads with the client share, and creations.

Starts an embedded PostgreSQL and a real guardian node (mTLS, same process),
builds the vault domain as the gateway does, and measures, at concurrency C:

* the 2-of-3 combine alone (pycryptodome Shamir on two 16-byte halves + KCV);
* reads/s with the client share (DB fetch, unwrap gateway share, combine, verify,
  AES-GCM open, audit record to thermal memory — the local batched writer);
* reads/s with read auditing off (``vault.audit_reads = false``);
* creations/s (split, seal, DepositShare to the guardian over mTLS — which audits —,
  insert, audit).

Usage: python bench/vault.py [--reads N] [--creates N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation.config import DatabaseConfig, MemoryConfig, VaultConfig  # noqa: E402
from federation.crypto.envelope import new_data_key, open_with_shares, seal  # noqa: E402
from federation.crypto.keyfile import load_or_create_key  # noqa: E402
from federation.crypto.shares import new_key_id, split_key  # noqa: E402
from federation.db import Database, ensure_database  # noqa: E402
from federation.db.embedded import EmbeddedPostgres  # noqa: E402
from federation.guardian.client import GrpcGuardianClient  # noqa: E402
from federation.memory.store import MemoryStore  # noqa: E402
from federation.vault.service import VaultService, create_gateway_pool  # noqa: E402
from tests.guardian_support import SwitchableSink, build_guardian, start_guardian  # noqa: E402
from tests.support import TestPKI  # noqa: E402


async def rate(label: str, total: int, concurrency: int, make: object) -> float:
    queue = list(range(total))

    async def worker() -> None:
        while queue:
            queue.pop()
            await make()  # type: ignore[operator]

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    per_second = total / elapsed
    print(f"{label:<44} {per_second:>9.0f}/s   ({total} in {elapsed:.2f} s)")
    return per_second


def combine_only(n: int) -> None:
    key, key_id = new_data_key(), new_key_id()
    sealed = seal(key, b"x" * 64, tenant_id="t", object_id="o", version=1, key_id=key_id)
    a, b, _ = split_key(key, key_id)
    started = time.perf_counter()
    for _ in range(n):
        open_with_shares(a, b, sealed)
    elapsed = time.perf_counter() - started
    print(f"{'combine + verify + open (in-process, 1 core)':<44} {n / elapsed:>9.0f}/s   "
          f"({elapsed / n * 1e6:.0f} µs each)")


async def main(reads: int, creates: int, concurrency: int) -> None:
    combine_only(500)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        server = EmbeddedPostgres(Path(tmp) / "pg")
        dsn = server.start()
        try:
            await ensure_database(dsn.url("postgres"), "bench")
            database = Database(dsn.url("bench"),
                                DatabaseConfig(pool_min_size=4, pool_max_size=20))
            await database.start()
            # Thermal memory gets its own pool, as the memory node has its own process: the
            # guardian and the vault hold a transaction open while their audit record is
            # written, so sharing one small pool with the writer would starve it.
            memory_db = Database(dsn.url("bench"), DatabaseConfig(pool_min_size=2,
                                                                  pool_max_size=4))
            await memory_db.start()
            store = MemoryStore(memory_db.pool, MemoryConfig())
            await store.start()
            sink = SwitchableSink(store)
            pki = TestPKI(home)
            custody, log = build_guardian(database, home, sink)
            node = await start_guardian(pki, custody, log)
            channel = node.channel("gateway")
            key = load_or_create_key(home / "gateway/wrapping.key")
            guardian = GrpcGuardianClient(channel, 5.0)
            pool = await create_gateway_pool(
                dsn.url("bench"), DatabaseConfig(pool_min_size=4, pool_max_size=20))
            vault = VaultService(pool, key, guardian, sink, VaultConfig(),
                                 pool_is_gateway_role=True)
            quiet = VaultService(pool, key, guardian, sink, VaultConfig(audit_reads=False),
                                 pool_is_gateway_role=True)
            try:
                counter = iter(range(10**9))

                async def create() -> None:
                    await vault.create(tenant_id="bench", name=f"s{next(counter)}",
                                       value=os.urandom(64), actor="key_bench")

                await create()  # warm up the channel and the pool
                await rate(f"creations (concurrency {concurrency})", creates, concurrency, create)
                issued = await vault.create(tenant_id="bench", name="hot", value=b"v" * 64,
                                            actor="key_bench")

                async def read(service: VaultService = vault) -> None:
                    await service.read(tenant_id="bench", secret_id=issued.info.id,
                                       client_share=issued.client_share, actor="key_bench")

                async def read_quiet() -> None:
                    await read(quiet)

                await rate(f"reads, audited (concurrency {concurrency})", reads, concurrency,
                           read)
                await rate(f"reads, not audited (concurrency {concurrency})", reads,
                           concurrency, read_quiet)
            finally:
                await channel.close()
                await pool.close()
                await node.server.stop(0)
                await store.stop()
                await memory_db.stop()
                await database.stop()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--creates", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    options = parser.parse_args()
    asyncio.run(main(options.reads, options.creates, options.concurrency))
