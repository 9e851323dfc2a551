"""The chain writer: serialised appends, batched for throughput.

Building the chain needs the previous record's hash, so appends must be
serialised. Doing that one record per transaction caps throughput at one
commit round-trip per record. Instead, concurrent ``append`` calls queue up and
one task writes everything queued in a single transaction: take the chain lock
(``pg_advisory_xact_lock``, so several processes sharing a database also
serialise), read the head, hash the batch, ``COPY`` it in, commit. Each caller
awaits its own record's commit and gets the error if the batch failed, so
callers can fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Final

import asyncpg
from opentelemetry.context import Context

from federation.clock import Clock, utc_now
from federation.db.errors import outage_error
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
COLUMNS: Final = (
    "sequence", "tenant_id", "actor", "action", "subject", "request_id", "created_at",
    "attributes", "body", "prev_hash", "hash", "temperature", "compressed",
)

_Pending = tuple[AuditEntry, "asyncio.Future[MemoryRecord]", "Context | None"]
"""An entry, its caller's future, and its caller's trace (``None`` unless tracing)."""


class ChainWriter:
    """Appends records to the chain; ``start()`` before use, ``stop()`` after."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        default_temperature: int = 100,
        max_batch: int = 512,
        clock: Clock = utc_now,
    ) -> None:
        self._pool = pool
        self._default_temperature = clamp_temperature(default_temperature)
        self._max_batch = max_batch
        self._clock = clock
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
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
        self._fail_pending(FederationError(ErrorCode.UNAVAILABLE, "thermal memory is stopping"))

    async def append(self, entry: AuditEntry) -> MemoryRecord:
        """Queue ``entry`` and return its record once committed."""
        if self._task is None or self._stopping:
            raise FederationError(ErrorCode.UNAVAILABLE, "thermal memory is not accepting records")
        if not entry.request_id:
            entry = replace(entry, request_id=request_id_var.get())
        future: asyncio.Future[MemoryRecord] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, future, tracing.current_context()))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._write_batch(batch)
            if self._stopping:
                return

    async def _write_batch(self, batch: list[_Pending]) -> None:
        try:
            # The batch's statements join the trace of its first record's request.
            with tracing.continued(batch[0][2]), tracing.span(
                    "thermal_memory.append",
                    attributes={"records": len(batch),
                                tracing.REQUEST_ID_ATTRIBUTE: batch[0][0].request_id}):
                records = await self._append_many([entry for entry, _, _ in batch])
        except Exception as exc:
            log.exception("thermal memory append failed", extra={"records": len(batch)})
            outage = outage_error(exc)
            reason = f": {outage.message}" if outage is not None else ""
            error = FederationError(
                ErrorCode.UNAVAILABLE, f"thermal memory could not store the record{reason}",
                retry_after_seconds=outage.retry_after_seconds if outage else None,
            )
            error.__cause__ = exc
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future, _), record in zip(batch, records, strict=True):
            if not future.done():
                future.set_result(record)

    async def _append_many(self, entries: list[AuditEntry]) -> list[MemoryRecord]:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK_KEY)
            head = await conn.fetchrow(
                "SELECT sequence, hash FROM memory_records ORDER BY sequence DESC LIMIT 1"
            )
            sequence, prev_hash = (head["sequence"], head["hash"]) if head else (0, GENESIS_HASH)
            records: list[MemoryRecord] = []
            for entry in entries:
                sequence += 1
                record = self._build(entry, sequence, prev_hash)
                records.append(record)
                prev_hash = record.hash
            await conn.copy_records_to_table(
                "memory_records", records=[_row(r) for r in records], columns=COLUMNS
            )
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


def _row(record: MemoryRecord) -> tuple[object, ...]:
    return (
        record.sequence, record.tenant_id, record.actor, record.action, record.subject,
        record.request_id, record.created_at, json.dumps(dict(record.attributes), sort_keys=True),
        record.body, record.prev_hash, record.hash, record.temperature, False,
    )
