"""Key records cached in the key authority's process: the verification hot path
reads a known key without touching the database.

Bounded (least recently used out first) and short-lived (``keys.cache_ttl_seconds``);
the authority drops a key at once when it revokes, rotates or suspends it, and
refreshes a key's usage after each flush of verified uses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

import asyncpg

from federation.keys import repository as repo
from federation.keys.models import KeyRecord
from federation.keys.strength import Accumulator


@dataclass(frozen=True)
class SourceState:
    failures: Accumulator
    burst: Accumulator
    verified: bool
    suspended: bool

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> SourceState:
        return cls(
            Accumulator(row["failure_value"], repo.posix(row["failure_at"])),
            Accumulator(row["burst_value"], repo.posix(row["burst_at"])),
            row["verified"], row["suspended_at"] is not None,
        )


@dataclass
class CachedKey:
    record: KeyRecord
    loaded_at: float
    sources: dict[str, SourceState]
    recent_uses: Accumulator = field(default_factory=Accumulator)


class KeyCache:
    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float, size: int) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._size = size
        self._keys: OrderedDict[str, CachedKey] = OrderedDict()

    async def get(self, key_id: str, now: float) -> CachedKey | None:
        """The key's record and per-source state; ``None`` for an unknown key."""
        cached = self._keys.get(key_id)
        if cached is not None and now - cached.loaded_at < self._ttl:
            return cached
        async with self._pool.acquire() as conn:
            record = await repo.get_key(conn, key_id, None)
            if record is None:
                self._keys.pop(key_id, None)
                return None
            rows = await repo.source_rows(conn, record.tenant_id, key_id)
        fresh = CachedKey(record, now, {r["source"]: SourceState.from_row(r) for r in rows})
        if cached is not None:
            fresh.recent_uses = cached.recent_uses
        self._keys[key_id] = fresh
        self._keys.move_to_end(key_id)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return fresh

    def drop(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def refresh_usage(self, records: list[KeyRecord]) -> None:
        """Take the usage and last use of freshly flushed ``records``."""
        for record in records:
            cached = self._keys.get(record.key_id)
            if cached is not None:
                cached.record = replace(cached.record, usage=record.usage,
                                        last_used_at=record.last_used_at)
