"""Job events to thermal memory: a transactional outbox drained into an AuditSink.

Job state changes (submission, lease, retry, release, completion,
dead-lettering, expiry, cancellation), device registrations, revocations and
online/offline transitions, and the credentials handed out (enrollment tokens,
enrollments, renewals) insert their event into
``edge_audit_outbox`` in the same transaction, so an event exists exactly when
its change committed, and a slow or unreachable memory node never holds a row
lock or fails a device's call. The broker drains the outbox in order into an
:class:`~federation.memory.sink.AuditSink`: in production
:class:`~federation.memory.client.GrpcAuditSink` (``ThermalMemoryService.RecordMemory``
on the memory peer), in tests also the memory node's own ``MemoryStore``.
Delivery is at least once: a crash between append and delete repeats one event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import asyncpg

from federation.db.errors import log_job_failure
from federation.db.sessions import session_advisory_lock
from federation.logs import request_id_var
from federation.memory.records import AuditEntry
from federation.memory.sink import AuditSink

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    from asyncpg.pool import PoolConnectionProxy

    Conn = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    """A connection in a transaction: a pool's or one of its own."""

log = logging.getLogger(__name__)

OUTBOX_LOCK_KEY = 0x46454452_41554454  # "FEDRAUDT"


async def write_audit(
    conn: Conn,
    *,
    tenant_id: str,
    actor: str,
    action: str,
    subject: str,
    attributes: Mapping[str, str],
) -> None:
    """Queue one thermal-memory event in the caller's transaction."""
    await conn.execute(
        "INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes, request_id)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        tenant_id,
        actor,
        action,
        subject,
        json.dumps(dict(attributes), sort_keys=True),
        request_id_var.get(),
    )


def entry_from_row(row: Any) -> AuditEntry:
    attributes = row["attributes"]
    if isinstance(attributes, str):
        attributes = json.loads(attributes)
    return AuditEntry(
        actor=row["actor"],
        action=row["action"],
        tenant_id=row["tenant_id"],
        subject=row["subject"],
        attributes={str(k): str(v) for k, v in attributes.items()},
        request_id=row["request_id"],
    )


class AuditOutbox:
    """Drains ``edge_audit_outbox`` into a sink, oldest first, one drainer at a time."""

    def __init__(self, pool: asyncpg.Pool, sink: AuditSink | None, batch: int = 200) -> None:
        self._pool = pool
        self._sink = sink
        self._batch = batch

    async def flush_once(self) -> int:
        """Deliver pending events; returns how many. Stops at the first sink failure."""
        if self._sink is None:
            return 0
        delivered = 0
        async with self._pool.acquire() as conn, \
                session_advisory_lock(conn, OUTBOX_LOCK_KEY) as draining:
            if not draining:
                return 0  # another broker process is draining
            rows = await conn.fetch(
                "SELECT * FROM edge_audit_outbox ORDER BY id LIMIT $1", self._batch
            )
            for row in rows:
                await self._sink.record(entry_from_row(row))
                await conn.execute(
                    "DELETE FROM edge_audit_outbox WHERE tenant_id = $1 AND id = $2",
                    row["tenant_id"],
                    row["id"],
                )
                delivered += 1
        return delivered

    async def run(self, interval_seconds: float) -> None:
        """Flush every ``interval_seconds`` until cancelled; failures are retried."""
        while True:
            try:
                while await self.flush_once() >= self._batch:
                    pass
            except Exception as exc:  # an outage (timeouts included) must not end it
                log_job_failure(log, "audit outbox flush failed; will retry", exc)
            await asyncio.sleep(interval_seconds)
