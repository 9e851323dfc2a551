"""The reaper: offline devices, expired leases and passed deadlines.

Devices that went silent are marked offline, audited (``edge.device.offline``)
in the same statement. Every broker process runs the loop; each pass first
takes a transaction-level advisory lock with ``pg_try_advisory_xact_lock``, so
exactly one process reaps at a time and the others skip the pass. Everything is
recovered from the job rows themselves (``lease_expires_at``, ``deadline``),
never from device or worker rows, so no job can be stranded by a pruned or
missing worker record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from federation.config import EdgeConfig
from federation.db.errors import outage_error

log = logging.getLogger(__name__)

REAPER_LOCK_KEY = 0x46454452_45444745  # "FEDREDGE"
BROKER_ACTOR = "edge-broker"

# A device's state is stored, so going offline is a state change: audited with it.
_MARK_OFFLINE = """
WITH offline AS (
    UPDATE edge_devices SET state = 'offline'
    WHERE state = 'online' AND last_heartbeat_at < now() - make_interval(secs => $1)
    RETURNING device_id, last_heartbeat_at
), audited AS (
    INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes)
    SELECT '', $2, 'edge.device.offline', device_id,
           jsonb_build_object('previous_state', 'online',
                              'last_heartbeat_at', last_heartbeat_at::text)
    FROM offline
)
SELECT device_id FROM offline ORDER BY device_id
"""

_EXPIRE_DEADLINES = """
WITH expired AS (
    UPDATE edge_jobs SET state = 'expired', lease_expires_at = NULL, updated_at = now()
    WHERE state IN ('pending', 'failed', 'leased') AND deadline <= now()
    RETURNING tenant_id, job_id, attempts
), audited AS (
    INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes)
    SELECT tenant_id, $1, 'edge.job.expire', job_id::text,
           jsonb_build_object('attempts', attempts::text)
    FROM expired
    RETURNING 1
)
SELECT count(*) FROM expired
"""

# A lapsed lease counts as a spent attempt (it was counted when leased): the job
# goes back to PENDING at once, or to DEAD_LETTER when no attempt is left.
_RELEASE_LEASES = """
WITH released AS (
    UPDATE edge_jobs SET
        state = CASE WHEN attempts >= max_attempts THEN 'dead_letter' ELSE 'pending' END,
        last_error = CASE WHEN leased_by = ANY($2::text[]) THEN 'device went offline'
                          ELSE 'lease expired' END,
        lease_expires_at = NULL, available_at = now(), updated_at = now()
    WHERE state = 'leased' AND (lease_expires_at <= now() OR leased_by = ANY($2::text[]))
    RETURNING tenant_id, job_id, state, attempts, last_error
), audited AS (
    INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes)
    SELECT tenant_id, $1,
           CASE WHEN state = 'dead_letter' THEN 'edge.job.dead_letter'
                ELSE 'edge.job.release' END,
           job_id::text,
           jsonb_build_object('attempts', attempts::text, 'last_error', last_error)
    FROM released
    RETURNING action
)
SELECT count(*) AS released,
       (SELECT count(*) FROM audited WHERE action = 'edge.job.dead_letter') AS dead_lettered
FROM released
"""


@dataclass(frozen=True)
class ReapReport:
    offline_devices: tuple[str, ...] = ()
    expired_jobs: int = 0
    released_leases: int = 0
    dead_lettered: int = 0


class Reaper:
    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig) -> None:
        self._pool = pool
        self._config = config

    async def reap_once(self) -> ReapReport | None:
        """One pass; ``None`` when another process holds the reaper lock."""
        async with self._pool.acquire() as conn, conn.transaction():
            elected = await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", REAPER_LOCK_KEY)
            if not elected:
                return None
            return await self._reap(conn)

    async def _reap(self, conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any]) -> ReapReport:
        silence = self._config.heartbeat_interval_seconds * self._config.offline_after_intervals
        went_offline = await conn.fetch(_MARK_OFFLINE, silence, BROKER_ACTOR)
        offline = tuple(r["device_id"] for r in went_offline)
        expired = int(await conn.fetchval(_EXPIRE_DEADLINES, BROKER_ACTOR))
        released = await conn.fetchrow(_RELEASE_LEASES, BROKER_ACTOR, list(offline))
        assert released is not None  # an aggregate always returns one row
        report = ReapReport(
            offline_devices=offline,
            expired_jobs=expired,
            released_leases=int(released["released"]),
            dead_lettered=int(released["dead_lettered"]),
        )
        if offline or expired or report.released_leases:
            log.info(
                "reaped",
                extra={
                    "offline_devices": len(offline),
                    "expired_jobs": expired,
                    "released_leases": report.released_leases,
                    "dead_lettered": report.dead_lettered,
                },
            )
        return report

    async def run(self) -> None:
        """Reap every ``reaper_interval_seconds`` until cancelled."""
        in_outage = False
        while True:
            try:
                await self.reap_once()
                in_outage = False
            except Exception as exc:  # an outage (timeouts included) must not end the reaper
                outage = outage_error(exc) is not None
                if not outage:
                    log.exception("reaper pass failed; retrying next interval")
                elif not in_outage:  # once per outage, not a traceback every interval
                    log.warning("reaper paused: the database is unavailable; retrying every "
                                f"{self._config.reaper_interval_seconds:g}s")
                in_outage = outage
            await asyncio.sleep(self._config.reaper_interval_seconds)
