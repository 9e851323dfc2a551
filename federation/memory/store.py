"""Thermal memory over PostgreSQL: record, read (warms), search, verify, cool.

``MemoryStore`` is the local :class:`~federation.memory.sink.AuditSink` (the
memory node itself uses it) and the domain core behind ThermalMemoryService.
Tenant scoping: every read takes ``tenant_id``; ``None`` means "any tenant" and
is only passed for operator (admin) callers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import asyncpg

from federation.clock import Clock, utc_now
from federation.config import MemoryConfig
from federation.errors import ErrorCode, FederationError
from federation.memory.records import GENESIS_HASH, AuditEntry, MemoryRecord, Tier
from federation.memory.restore_event import (
    RESTORE_ACTION,
    RestoreClaim,
    RestoreEventError,
    RestoreVerifier,
)
from federation.memory.writer import ChainWriter
from federation.paging import page_size as checked_page_size
from federation.paging import sequence_token

log = logging.getLogger(__name__)

SEARCH_PAGE_BYTES: Final = 1024 * 1024
"""Most record content one search page carries (a record holds up to a whole request):
a page of large records otherwise outgrew gRPC's message limit (4 MiB by default), and
the search failed RESOURCE_EXHAUSTED on the server's side, page after page."""


@dataclass(frozen=True)
class SearchQuery:
    tenant_id: str | None
    """``None``: every tenant (operators only)."""
    action_prefix: str = ""
    request_id: str = ""
    actor: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    tier: Tier | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class SearchPage:
    records: list[MemoryRecord]
    next_page_token: str


@dataclass(frozen=True)
class ChainReport:
    """Outcome of walking (part of) the chain."""

    intact: bool
    records_checked: int
    first_bad_sequence: int | None = None
    problem: str = ""
    restores: tuple[RestoreClaim, ...] = ()
    """Every valid restore event met on the way (each declares the gap before it)."""


class MemoryStore:
    """The thermal memory domain; ``start()`` before use, ``stop()`` after."""

    def __init__(
        self, pool: asyncpg.Pool, config: MemoryConfig, *, clock: Clock = utc_now,
        restore_verifier: RestoreVerifier | None = None,
    ) -> None:
        """``restore_verifier``: checks restore events (``None``: a restore event, and so
        the gap before it, cannot be accepted)."""
        self._pool = pool
        self._config = config
        self._restore_verifier = restore_verifier
        self._writer = ChainWriter(
            pool, default_temperature=config.initial_temperature,
            max_batch=config.max_batch, max_batch_bytes=config.max_batch_bytes,
            max_attempts=config.append_attempts, clock=clock,
        )

    async def start(self) -> None:
        await self._writer.start()

    async def stop(self) -> None:
        await self._writer.stop()

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        """Append ``entry``; returns once it is committed (AuditSink)."""
        return await self._writer.append(entry)

    async def record_many(self, entries: list[AuditEntry]) -> list[MemoryRecord]:
        """Append ``entries`` in order, sharing commits; returns once all are committed."""
        return await self._writer.append_many(entries)

    async def read(self, tenant_id: str | None, sequence: int) -> MemoryRecord:
        """One record; reading warms it by ``read_bump`` degrees."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE memory_records SET temperature = least(100, temperature + $3) "
                "WHERE sequence = $1 AND ($2::text IS NULL OR tenant_id = $2) RETURNING *",
                sequence, tenant_id, self._config.read_bump,
            )
            if row is None:
                raise FederationError(
                    ErrorCode.NOT_FOUND, f"no memory record {sequence} for this tenant",
                    param="sequence",
                )
            record = record_from_row(row)
            if record.compressed and record.temperature >= self._config.compress_below:
                # Warm again: store it uncompressed, as the warm and hot tiers are.
                await conn.execute(
                    "UPDATE memory_records SET body = $2, compressed = false WHERE sequence = $1",
                    sequence, record.body,
                )
                record = replace(record, compressed=False)
        return record

    async def search(self, query: SearchQuery) -> SearchPage:
        """Matching records, newest first. Does not change temperatures."""
        size = checked_page_size(query.page_size)
        where, args = _search_filters(query)
        args.append(size + 1)
        rows = await self._pool.fetch(
            f"SELECT * FROM memory_records WHERE {' AND '.join(where)} "
            f"ORDER BY sequence DESC LIMIT ${len(args)}",
            *args,
        )
        records = _within_budget([record_from_row(r) for r in rows[:size]])
        more = len(rows) > len(records)
        return SearchPage(records, str(records[-1].sequence) if more else "")

    async def trail(self, request_id: str, tenant_id: str | None = None) -> list[MemoryRecord]:
        """Every record written while serving ``request_id``, oldest first."""
        rows = await self._pool.fetch(
            "SELECT * FROM memory_records WHERE request_id = $1 "
            "AND ($2::text IS NULL OR tenant_id = $2) ORDER BY sequence",
            request_id, tenant_id,
        )
        return [record_from_row(r) for r in rows]

    async def head(self) -> int:
        """Sequence of the newest record (0 when empty)."""
        value = await self._pool.fetchval("SELECT coalesce(max(sequence), 0) FROM memory_records")
        return int(value)

    async def hash_at(self, sequence: int) -> bytes | None:
        """The stored hash of record ``sequence`` (``None`` if missing). Unlike
        :meth:`read`, it does not warm the record: verification is not a use."""
        value = await self._pool.fetchval(
            "SELECT hash FROM memory_records WHERE sequence = $1", sequence
        )
        return bytes(value) if value is not None else None

    async def head_hash(self) -> tuple[int, bytes] | None:
        """``(sequence, hash)`` of the newest record, ``None`` when the chain is empty."""
        row = await self._pool.fetchrow(
            "SELECT sequence, hash FROM memory_records ORDER BY sequence DESC LIMIT 1"
        )
        return (int(row["sequence"]), bytes(row["hash"])) if row is not None else None

    async def verify_chain(self, from_sequence: int = 1, to_sequence: int = 0) -> ChainReport:
        """Recompute every hash and link in the range; report the first problem.

        A ``to_sequence`` past the head stops at the head: nothing says a record after it
        should exist (a signed checkpoint beyond the head does, and the caller compares
        those)."""
        first = max(from_sequence, 1)
        head = await self.head()
        last = min(to_sequence, head) if to_sequence else head
        walker = _ChainWalker(*await self._start_before(first), self._restore_verifier)
        cursor = first
        while cursor <= last:
            rows = await self._pool.fetch(
                "SELECT * FROM memory_records WHERE sequence >= $1 AND sequence <= $2 "
                "ORDER BY sequence LIMIT $3",
                cursor, last, self._config.verify_page_size,
            )
            if not rows:
                break
            for row in rows:
                if not walker.check(row):
                    return walker.report()
            cursor = rows[-1]["sequence"] + 1
        walker.expect_end(last)
        return walker.report()

    async def _start_before(self, sequence: int) -> tuple[int, bytes | None]:
        """Where a walk from ``sequence`` starts: the sequence it expects first and the hash
        that record must link to. When record ``sequence - 1`` is missing (it may be in the
        gap a restore event declares), the walk starts after the last record before it."""
        if sequence == 1:
            return 1, GENESIS_HASH
        row = await self._pool.fetchrow(
            "SELECT sequence, hash FROM memory_records WHERE sequence < $1 "
            "ORDER BY sequence DESC LIMIT 1", sequence,
        )
        if row is None:
            return sequence, None
        return int(row["sequence"]) + 1, bytes(row["hash"])

    async def cool(self, degrees: int | None = None) -> int:
        """Lower every record's temperature; compress what went cold. Returns rows cooled."""
        amount = self._config.decay_amount if degrees is None else degrees
        status = await self._pool.execute(
            "UPDATE memory_records SET temperature = greatest(0, temperature - $1) "
            "WHERE temperature > 0",
            amount,
        )
        await self.compress_cold()
        return int(status.split()[-1])

    async def compress_cold(self, page: int = 500) -> int:
        """Compress bodies of cold and ember records; never deletes anything."""
        done = 0
        while True:
            rows = await self._pool.fetch(
                "SELECT sequence, body FROM memory_records WHERE NOT compressed "
                "AND temperature < $1 AND octet_length(body) > 64 ORDER BY sequence LIMIT $2",
                self._config.compress_below, page,
            )
            if not rows:
                return done
            await self._pool.executemany(
                "UPDATE memory_records SET body = $2, compressed = true WHERE sequence = $1",
                [(r["sequence"], zlib.compress(bytes(r["body"]), 9)) for r in rows],
            )
            done += len(rows)


class _ChainWalker:
    """Checks records one by one, in order, remembering the first problem."""

    def __init__(self, first: int, prev_hash: bytes | None,
                 restore_verifier: RestoreVerifier | None = None) -> None:
        self.expected = first
        self.prev_hash = prev_hash
        self.checked = 0
        self.bad: int | None = None
        self.problem = ""
        self.restores: list[RestoreClaim] = []
        self._restore_verifier = restore_verifier
        if prev_hash is None:
            self._fail(first - 1, f"record {first - 1} is missing")

    def check(self, row: asyncpg.Record) -> bool:
        if self.bad is not None:
            return False
        sequence = int(row["sequence"])
        if row["action"] == RESTORE_ACTION and not self._accept_restore(row):
            return False
        if sequence != self.expected:
            return self._fail(self.expected, f"record {self.expected} is missing")
        try:
            record = record_from_row(row)
        except zlib.error:
            return self._fail(sequence, f"record {sequence} has a corrupt compressed body")
        self.checked += 1
        if record.prev_hash != self.prev_hash:
            return self._fail(sequence, f"record {sequence} does not link to record {sequence - 1}")
        if record.computed_hash() != record.hash:
            return self._fail(sequence, f"record {sequence} was altered: its hash does not match")
        self.prev_hash = record.hash
        self.expected += 1
        return True

    def _accept_restore(self, row: asyncpg.Record) -> bool:
        """A restore event may follow a gap: exactly the one it declares, if it verifies."""
        sequence = int(row["sequence"])
        if self._restore_verifier is None:
            return self._fail(sequence, f"record {sequence} is a restore event, and this "
                                        "node has no CA certificate to verify it")
        try:
            claim = self._restore_verifier.check(record_from_row(row))
        except (RestoreEventError, zlib.error) as exc:
            return self._fail(sequence, f"record {sequence} is a restore event that does not "
                                        f"verify: {exc}")
        if claim.lost_from > self.expected:
            return self._fail(self.expected, f"record {self.expected} is missing")
        if claim.lost_from < self.expected:
            return self._fail(sequence, f"record {sequence} is a restore event declaring "
                                        f"records {claim.lost_from}..{claim.lost_to} lost, "
                                        f"but record {self.expected - 1} is there")
        self.restores.append(claim)
        self.expected = sequence
        return True

    def expect_end(self, last: int) -> None:
        if self.bad is None and self.expected <= last:
            self._fail(self.expected, f"record {self.expected} is missing")

    def report(self) -> ChainReport:
        return ChainReport(self.bad is None, self.checked, self.bad, self.problem,
                           tuple(self.restores))

    def _fail(self, sequence: int, problem: str) -> bool:
        if self.bad is None:
            self.bad, self.problem = sequence, problem
        return False


def record_from_row(row: asyncpg.Record) -> MemoryRecord:
    body = bytes(row["body"])
    if row["compressed"]:
        body = zlib.decompress(body)
    return MemoryRecord(
        sequence=row["sequence"], tenant_id=row["tenant_id"], actor=row["actor"],
        action=row["action"], subject=row["subject"], request_id=row["request_id"],
        created_at=row["created_at"], attributes=_attributes(row["attributes"]), body=body,
        prev_hash=bytes(row["prev_hash"]), hash=bytes(row["hash"]),
        temperature=row["temperature"], compressed=row["compressed"],
    )


def _attributes(raw: str | Mapping[str, Any]) -> dict[str, str]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    # Kept verbatim (no str() coercion) so a tampered non-string value changes the hash.
    return dict(value)




def _within_budget(records: list[MemoryRecord]) -> list[MemoryRecord]:
    """The first of ``records`` (at least one) whose content fits
    :data:`SEARCH_PAGE_BYTES`; the next page starts after the last one kept."""
    used = 0
    for count, record in enumerate(records):
        used += _content_bytes(record)
        if used > SEARCH_PAGE_BYTES and count:
            return records[:count]
    return records


def _content_bytes(record: MemoryRecord) -> int:
    texts = (record.tenant_id, record.actor, record.action, record.subject, record.request_id,
             *record.attributes.keys(), *record.attributes.values())
    return len(record.body) + sum(len(str(t).encode()) for t in texts)  # str: tampered values


def _search_filters(query: SearchQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = ["true"]
    args: list[Any] = []

    def add(clause: str, value: Any) -> None:
        args.append(value)
        where.append(clause.replace("?", f"${len(args)}"))

    if query.tenant_id is not None:
        add("tenant_id = ?", query.tenant_id)
    if query.action_prefix:
        add("starts_with(action, ?)", query.action_prefix)
    if query.request_id:
        add("request_id = ?", query.request_id)
    if query.actor:
        add("actor = ?", query.actor)
    if query.start_time is not None:
        add("created_at >= ?", query.start_time)
    if query.end_time is not None:
        add("created_at < ?", query.end_time)
    if query.tier is not None:
        low, high = query.tier.bounds
        add("temperature >= ?", low)
        add("temperature <= ?", high)
    if query.page_token:
        add("sequence < ?", sequence_token(query.page_token))
    return where, args

