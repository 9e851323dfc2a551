"""The chain writer: a group commit of the hash chain, the chain head kept in memory.

Building the chain needs the previous record's hash, so appends are
serialised: one task writes, and concurrent ``append`` calls queue up behind
it. When the writer is idle a record is written at once (no linger); the
records that arrive while a commit is in flight all go into the next one, so
under load one commit carries many records. Each caller awaits its own
record's commit and gets the error if the batch failed, so callers can fail
closed.

The writer keeps the chain head (sequence and hash of the newest record) in
memory and appends a batch with one statement, one round trip and one
commit, with no lock: the statement inserts only if the head it links to is
still the newest record (that sequence with that hash exists, none after it:
two index probes in the same statement; and the primary key on ``sequence``
refuses a second record at any position, which settles two writers racing
for the same one). So a second writer on the same database (another memory
process, ``federation restore``) or a database that went back (a failover to
a standby that had not received the last commits) cannot break the chain:
the insert is refused, the writer re-reads the head and writes the batch
again, linked to the real head. After any failure the head is re-read too.
Records are immutable (the database refuses UPDATE of their content, DELETE
and TRUNCATE), so a head once seen stays valid until someone appends after
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry.context import Context

from federation.clock import Clock, utc_now
from federation.db.errors import log_job_failure, outage_error
from federation.errors import ErrorCode, FederationError
from federation.logs import request_id_var
from federation.memory.records import (
    GENESIS_HASH,
    AuditEntry,
    MemoryRecord,
    chain_hash,
    clamp_temperature,
)
from federation.telemetry import tracing

log = logging.getLogger(__name__)

CHAIN_LOCK_KEY: Final = 0x46454452_43484149  # "FEDRCHAI"
"""Taken by ``federation restore`` around its restore event; the writer needs no lock."""
COLUMNS: Final = (
    "sequence", "tenant_id", "actor", "action", "subject", "request_id", "created_at",
    "attributes", "body", "prev_hash", "hash", "temperature", "compressed",
)
_INSERT_LINKED: Final = """
INSERT INTO memory_records (sequence, tenant_id, actor, action, subject, request_id,
                            created_at, attributes, body, prev_hash, hash, temperature)
SELECT r.sequence, r.tenant_id, r.actor, r.action, r.subject, r.request_id,
       r.created_at, r.attributes::jsonb, r.body, r.prev_hash, r.hash, r.temperature
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::timestamptz[], $8::text[], $9::bytea[], $10::bytea[], $11::bytea[],
            $12::smallint[])
     AS r(sequence, tenant_id, actor, action, subject, request_id,
          created_at, attributes, body, prev_hash, hash, temperature)
WHERE (SELECT m.sequence FROM memory_records m ORDER BY m.sequence DESC LIMIT 1)
          IS NOT DISTINCT FROM NULLIF($13::bigint, 0)
  AND ($13 = 0 OR EXISTS (SELECT 1 FROM memory_records WHERE sequence = $13 AND hash = $14::bytea))
"""
"""Appends a batch linked to the head (``$13``, ``$14``) only while that head is the newest
record: 0 rows when the chain is not where the writer thinks (a record after it, say a
restore event further on, or the head itself gone); and the primary key refuses a record
at a position another writer is taking at the same moment. Both guards are lookups in the
primary key whatever the plan: the newest sequence by a backward index scan (``NOT EXISTS (…
WHERE sequence > $13)`` was planned as a sequential scan of the whole table once the prepared
statement went generic: 1.8 ms per append at 50,000 records, growing with the chain)."""
_READ_HEAD: Final = "SELECT sequence, hash FROM memory_records ORDER BY sequence DESC LIMIT 1"

_Head = tuple[int, bytes]
"""Sequence and hash of the newest record (``(0, GENESIS_HASH)``: the chain is empty)."""
_Pending = tuple[AuditEntry, "asyncio.Future[MemoryRecord]", "Context | None"]
"""An entry, its caller's future, and its caller's trace (``None`` unless tracing)."""


class ChainMoved(Exception):
    """The chain's head was not where the writer thought: another writer appended."""


class ChainWriter:
    """Appends records to the chain; ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        default_temperature: int = 100,
        max_batch: int = 512,
        max_batch_bytes: int = 64 << 20,
        max_attempts: int = 8,
        clock: Clock = utc_now,
    ) -> None:
        """``max_attempts``: writes of one batch when other writers keep moving the head."""
        self._pool = pool
        self._default_temperature = clamp_temperature(default_temperature)
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._max_attempts = max_attempts
        self._clock = clock
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._head: _Head | None = None
        """The newest record as this writer knows it; ``None``: read it before writing."""
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        """The writer's own connection, kept from batch to batch (see ``_connection``)."""
        self.commits = 0
        """Batches committed (each one statement, one commit): how many records share one."""

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._head = None
            self._task = asyncio.create_task(self._run(), name="thermal-memory-writer")

    async def stop(self) -> None:
        """Write what is queued, then end the writer task."""
        if self._task is None:
            return
        self._stopping = True
        self._wakeup.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._release_connection()
        self._fail_pending(FederationError(ErrorCode.UNAVAILABLE, "thermal memory is stopping"))

    async def append(self, entry: AuditEntry) -> MemoryRecord:
        """Queue ``entry`` and return its record once committed."""
        return (await self.append_many([entry]))[0]

    async def append_many(self, entries: list[AuditEntry]) -> list[MemoryRecord]:
        """Queue ``entries`` (in order, so they share a commit up to ``max_batch``) and
        return their records once all are committed; raises the first failure."""
        if self._task is None or self._stopping:
            raise FederationError(ErrorCode.UNAVAILABLE, "thermal memory is not accepting records")
        loop = asyncio.get_running_loop()
        context = tracing.current_context()
        request_id = request_id_var.get()
        futures: list[asyncio.Future[MemoryRecord]] = []
        for entry in entries:
            if not entry.request_id and request_id:
                entry = replace(entry, request_id=request_id)
            future: asyncio.Future[MemoryRecord] = loop.create_future()
            self._queue.append((entry, future, context))
            futures.append(future)
        self._wakeup.set()
        if len(futures) == 1:
            return [await futures[0]]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [outcome for outcome in outcomes if isinstance(outcome, MemoryRecord)]

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._next_batch()
                await self._write_batch(batch)
            if self._stopping:
                return

    def _next_batch(self) -> list[_Pending]:
        """The queue's head, up to ``max_batch`` records and ``max_batch_bytes`` of
        content (at least one record, however large)."""
        taken, size = 0, 0
        for entry, _, _ in self._queue[: self._max_batch]:
            size += _content_bytes(entry)
            if taken and size > self._max_batch_bytes:
                break
            taken += 1
        batch = self._queue[:taken]
        del self._queue[:taken]
        return batch

    async def _write_batch(self, batch: list[_Pending]) -> None:
        try:
            # The batch's statements join the trace of its first record's request.
            with tracing.continued(batch[0][2]), tracing.span(
                    "thermal_memory.append",
                    attributes={"records": len(batch),
                                tracing.REQUEST_ID_ATTRIBUTE: batch[0][0].request_id}):
                records = await self._append_linked([entry for entry, _, _ in batch])
        except Exception as exc:
            self._head = None  # the outcome may be unknown (a lost commit): read it again
            log_job_failure(log, "thermal memory append failed", exc, records=len(batch))
            error = _append_error(exc)
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future, _), record in zip(batch, records, strict=True):
            if not future.done():
                future.set_result(record)

    async def _append_linked(self, entries: list[AuditEntry]) -> list[MemoryRecord]:
        """Write ``entries`` after the head; when another writer moved it, read the
        head and write them again (``max_attempts`` in all)."""
        for _ in range(self._max_attempts):
            conn = await self._connection()
            try:
                head = self._head if self._head is not None else await _read_head(conn)
                records = self._chain(entries, head)
                try:
                    inserted = await conn.execute(_INSERT_LINKED, *_columns(records), *head)
                except asyncpg.UniqueViolationError:
                    inserted = "INSERT 0 0"
            except BaseException:
                await self._release_connection()  # broken, perhaps: the pool replaces it
                raise
            if inserted != "INSERT 0 0":
                self._head = (records[-1].sequence, records[-1].hash)
                self.commits += 1
                return records
            log.info("the audit chain moved under this writer: reading its head again",
                     extra={"head": head[0]})
            self._head = None
        raise ChainMoved(f"other writers moved the chain {self._max_attempts} times in a row")

    async def _connection(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The single writer keeps one connection instead of taking one from the pool
        for every batch (~30 us per batch, measured at concurrency 1: issue 18); it goes
        back to the pool after a failure and at stop."""
        if self._conn is not None and _lost(self._conn):
            self._conn = None  # the server went away since the last batch: the pool knows
        if self._conn is None:
            self._conn = await self._pool.acquire()
        return self._conn

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    def _chain(self, entries: list[AuditEntry], head: _Head) -> list[MemoryRecord]:
        sequence, prev_hash = head
        records: list[MemoryRecord] = []
        for entry in entries:
            sequence += 1
            record = self._build(entry, sequence, prev_hash)
            records.append(record)
            prev_hash = record.hash
        return records

    def _build(self, entry: AuditEntry, sequence: int, prev_hash: bytes) -> MemoryRecord:
        created_at = self._clock()
        attributes = dict(entry.attributes)
        digest = chain_hash(
            prev_hash, sequence=sequence, tenant_id=entry.tenant_id, actor=entry.actor,
            action=entry.action, subject=entry.subject, request_id=entry.request_id,
            created_at=created_at, attributes=attributes, body=entry.body,
        )
        temperature = (
            self._default_temperature if entry.temperature is None
            else clamp_temperature(entry.temperature)
        )
        return MemoryRecord(
            sequence=sequence, tenant_id=entry.tenant_id, actor=entry.actor,
            action=entry.action, subject=entry.subject, request_id=entry.request_id,
            created_at=created_at, attributes=attributes, body=entry.body,
            prev_hash=prev_hash, hash=digest, temperature=temperature,
        )

    def _fail_pending(self, error: FederationError) -> None:
        pending, self._queue = self._queue, []
        for _, future, _ in pending:
            if not future.done():
                future.set_exception(error)


def _content_bytes(entry: AuditEntry) -> int:
    """About what ``entry`` adds to the INSERT's parameters (characters counted as bytes:
    an estimate, which the cap's margin under PostgreSQL's 1 GiB covers)."""
    return (len(entry.body) + len(entry.tenant_id) + len(entry.actor) + len(entry.action)
            + len(entry.subject) + len(entry.request_id)
            + sum(len(k) + len(v) for k, v in entry.attributes.items()))


def _lost(conn: PoolConnectionProxy[asyncpg.Record]) -> bool:
    """Whether a held connection is gone: closed, or (closed by the server) already taken
    back by its pool, which then refuses any call on it."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


async def _read_head(conn: PoolConnectionProxy[asyncpg.Record]) -> _Head:
    row = await conn.fetchrow(_READ_HEAD)
    return (row["sequence"], row["hash"]) if row is not None else (0, GENESIS_HASH)


def _columns(records: list[MemoryRecord]) -> tuple[list[object], ...]:
    """``records`` as the column arrays of ``_INSERT_LINKED`` ($1 to $12)."""
    return (
        [r.sequence for r in records], [r.tenant_id for r in records],
        [r.actor for r in records], [r.action for r in records],
        [r.subject for r in records], [r.request_id for r in records],
        [r.created_at for r in records],
        [json.dumps(dict(r.attributes), sort_keys=True) for r in records],
        [r.body for r in records], [r.prev_hash for r in records],
        [r.hash for r in records], [r.temperature for r in records],
    )


def _append_error(exc: Exception) -> FederationError:
    """UNAVAILABLE for every failure, with the database outage's reason and retry hint."""
    outage = outage_error(exc)
    if outage is not None:
        reason = f": {outage.message}"
    elif isinstance(exc, ChainMoved):
        reason = f": {exc}"
    else:
        reason = ""
    error = FederationError(
        ErrorCode.UNAVAILABLE, f"thermal memory could not store the record{reason}",
        retry_after_seconds=outage.retry_after_seconds if outage else None,
    )
    error.__cause__ = exc
    return error
