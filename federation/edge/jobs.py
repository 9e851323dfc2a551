"""The job queue in PostgreSQL: submit, lease, renew, complete, fail, cancel, list.

Correct with several broker processes on one database:

- Claims are ``SELECT … FOR UPDATE SKIP LOCKED``: two claimers never take the
  same row, and neither waits for the other.
- Every lease bumps the job's ``fencing_token``; renew/complete/fail are single
  conditional writes that must match the token, the holder, the LEASED state
  and an unexpired lease. A late answer from an expired lease matches nothing
  and is refused with FAILED_PRECONDITION; it cannot overwrite a new holder's
  result.
- The device row is locked (``FOR UPDATE``) while leasing, so one device's
  concurrent LeaseJobs calls cannot together exceed its allowance.

Expired leases, deadlines and offline devices are handled by :mod:`federation.edge.reaper`.
Events that thermal memory must record are written to the audit outbox in the
same transaction as the state change (see :mod:`federation.edge.audit`).
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg

from federation.config import EdgeConfig
from federation.edge.audit import write_audit
from federation.edge.devices import device_from_row
from federation.edge.fields import INT32_MAX, INT64_MAX, checked_int
from federation.edge.model import (
    Device,
    DeviceState,
    Job,
    JobSpec,
    JobState,
    JobType,
    Lease,
    Requirements,
    lease_allowance,
    parse_blob_digest,
)
from federation.errors import ErrorCode, FederationError
from federation.fields import storable, storable_all
from federation.logs import request_id_var
from federation.paging import page_size as checked_page_size

if TYPE_CHECKING:
    from federation.edge.audit import Conn


def _error(code: ErrorCode, message: str, param: str | None = None) -> FederationError:
    return FederationError(code, message, param=param)


def job_from_row(row: asyncpg.Record) -> Job:
    state = JobState(row["state"])
    return Job(
        job_id=str(row["job_id"]),
        tenant_id=row["tenant_id"],
        kind=row["kind"],
        job_type=JobType(row["job_type"]),
        state=state,
        requirements=Requirements(
            min_cpu_cores=row["min_cpu_cores"],
            min_memory_bytes=row["min_memory_bytes"],
            sensors=tuple(row["req_sensors"]),
            local_models=tuple(row["req_local_models"]),
            requires_charging=row["requires_charging"],
        ),
        deadline=row["deadline"],
        priority=row["priority"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        last_error=row["last_error"],
        leased_by=(row["leased_by"] or "") if state is JobState.LEASED else "",
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        inline_payload=row["inline_payload"],
        payload_blob=row["payload_blob"],
        inline_result=row["inline_result"] if state is JobState.SUCCEEDED else None,
        result_blob=row["result_blob"] if state is JobState.SUCCEEDED else None,
        fencing_token=row["fencing_token"],
        lease_id=str(row["lease_id"] or ""),
        lease_expires_at=row["lease_expires_at"],
    )


def claim_order_key(job: Job) -> tuple[Any, ...]:
    """The claim order in Python, for sorting RETURNING rows (which are unordered)."""
    far = dt.datetime.max.replace(tzinfo=dt.UTC)
    return (job.deadline or far, -job.priority, int(job.job_type), job.created_at)


_CLAIM = """
WITH picked AS (
    SELECT tenant_id, job_id FROM edge_jobs
    WHERE state IN ('pending', 'failed')
      AND available_at <= now()
      AND (deadline IS NULL OR deadline > now())
      AND ($2::boolean OR job_type = 2)
      AND min_cpu_cores <= $3
      AND min_memory_bytes <= $4
      AND req_sensors <@ $5::text[]
      AND req_local_models <@ $6::text[]
      AND (NOT requires_charging OR $7::boolean)
    ORDER BY deadline ASC NULLS LAST, priority DESC, job_type, created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE edge_jobs AS j
    SET state = 'leased', leased_by = $8, lease_id = gen_random_uuid(),
        fencing_token = j.fencing_token + 1, attempts = j.attempts + 1,
        lease_expires_at = now() + make_interval(secs => $9), updated_at = now()
    FROM picked
    WHERE j.tenant_id = picked.tenant_id AND j.job_id = picked.job_id
    RETURNING j.*
), audited AS (
    INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes, request_id)
    SELECT tenant_id, $8, 'edge.job.lease', job_id::text,
           jsonb_build_object('attempts', attempts::text,
                              'fencing_token', fencing_token::text), $10
    FROM leased
)
SELECT * FROM leased
"""

_OPEN_JOBS = """
SELECT count(*) FROM edge_jobs
WHERE tenant_id = $1 AND state IN ('pending', 'leased', 'failed')
"""

_HELD = """
SELECT count(*) FROM edge_jobs
WHERE state = 'leased' AND leased_by = $1 AND lease_expires_at > now()
"""


class JobQueue:
    """The queue's operations. Callers are already authenticated; ``device_id``
    is the caller's own identity, never a value taken from a request."""

    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig) -> None:
        self._pool = pool
        self._config = config

    # -- tenants -----------------------------------------------------------

    async def submit(self, spec: JobSpec, *, actor: str) -> Job:
        self._validate(spec)
        max_attempts = spec.max_attempts or self._config.default_max_attempts
        req = spec.requirements
        async with self._pool.acquire() as conn, conn.transaction():
            await self._check_depth(conn, spec.tenant_id)
            row = await conn.fetchrow(
                """
                INSERT INTO edge_jobs (tenant_id, job_id, kind, job_type, min_cpu_cores,
                    min_memory_bytes, req_sensors, req_local_models, requires_charging,
                    deadline, priority, max_attempts, inline_payload, payload_blob)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                RETURNING *
                """,
                spec.tenant_id,
                uuid.uuid4(),
                spec.kind,
                int(spec.job_type),
                req.min_cpu_cores,
                req.min_memory_bytes,
                sorted(set(req.sensors)),
                sorted(set(req.local_models)),
                req.requires_charging,
                spec.deadline,
                spec.priority,
                max_attempts,
                spec.inline_payload,
                spec.payload_blob,
            )
            assert row is not None
            job = job_from_row(row)
            await write_audit(
                conn,
                tenant_id=job.tenant_id,
                actor=actor,
                action="edge.job.submit",
                subject=job.job_id,
                attributes={"kind": job.kind, "type": job.job_type.name.lower()},
            )
        return job

    async def _check_depth(self, conn: Conn, tenant_id: str) -> None:
        """The tenant's queue depth, under its lock: concurrent submissions cannot
        together pass the limit."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 9))", tenant_id)
        open_jobs = await conn.fetchval(_OPEN_JOBS, tenant_id)
        limit = self._config.max_open_jobs_per_tenant
        if open_jobs >= limit:
            raise FederationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"tenant {tenant_id} has {open_jobs} unfinished edge jobs, the most allowed "
                f"(edge.max_open_jobs_per_tenant); submit again once some have finished",
                retry_after_seconds=5.0,
            )

    def _validate(self, spec: JobSpec) -> None:
        storable(spec.tenant_id, "tenant_id")
        storable(spec.kind, "kind")
        storable_all(spec.requirements.sensors, "sensors")
        storable_all(spec.requirements.local_models, "local_models")
        if not spec.tenant_id:
            raise _error(ErrorCode.INVALID_ARGUMENT, "tenant_id is required", "tenant_id")
        if not spec.kind:
            raise _error(ErrorCode.INVALID_ARGUMENT, "kind is required", "kind")
        if (spec.inline_payload is None) == (spec.payload_blob is None):
            raise _error(
                ErrorCode.INVALID_ARGUMENT,
                "set exactly one of inline_payload and payload_blob_digest",
                "payload",
            )
        limit = self._config.inline_payload_max_bytes
        if spec.inline_payload is not None and len(spec.inline_payload) > limit:
            raise _error(
                ErrorCode.OUT_OF_RANGE,
                f"inline payload is {len(spec.inline_payload)} bytes; the limit is {limit}: "
                "upload it and pass payload_blob_digest",
                "inline_payload",
            )
        if spec.payload_blob is not None:
            parse_blob_digest(spec.payload_blob)
        checked_int(spec.max_attempts, "max_attempts", INT32_MAX)
        checked_int(spec.requirements.min_cpu_cores, "min_cpu_cores", INT32_MAX)
        checked_int(spec.requirements.min_memory_bytes, "min_memory_bytes", INT64_MAX)

    async def get(self, job_id: str, tenant_id: str | None = None) -> Job:
        """The job; NOT_FOUND when absent or (with ``tenant_id``) another tenant's."""
        row = await self._pool.fetchrow(
            "SELECT * FROM edge_jobs WHERE job_id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
            _job_uuid(job_id),
            tenant_id,
        )
        if row is None:
            raise _error(ErrorCode.NOT_FOUND, f"no job {job_id}")
        return job_from_row(row)

    async def list_jobs(
        self, tenant_id: str, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """A page of the tenant's jobs, newest first (keyset pagination)."""
        if not storable(tenant_id, "tenant_id"):
            raise _error(ErrorCode.INVALID_ARGUMENT, "tenant_id is required", "tenant_id")
        size = checked_page_size(page_size)
        after_time, after_id = _decode_page_token(page_token)
        rows = await self._pool.fetch(
            """
            SELECT * FROM edge_jobs
            WHERE tenant_id = $1 AND ($2::text IS NULL OR state = $2)
              AND ($3::timestamptz IS NULL OR (created_at, job_id) < ($3, $4::uuid))
            ORDER BY created_at DESC, job_id DESC
            LIMIT $5
            """,
            tenant_id,
            state.value if state else None,
            after_time,
            after_id,
            size + 1,
        )
        jobs = [job_from_row(r) for r in rows[:size]]
        token = _encode_page_token(jobs[-1]) if len(rows) > size else ""
        return jobs, token

    async def cancel(self, job_id: str, reason: str, *, actor: str) -> Job:
        """Cancel unless terminal already; idempotent. A holder's later answer is refused."""
        storable(reason, "reason")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                UPDATE edge_jobs SET state = 'cancelled', last_error = $2,
                    lease_expires_at = NULL, updated_at = now()
                WHERE job_id = $1 AND state IN ('pending', 'leased', 'failed')
                RETURNING *
                """,
                _job_uuid(job_id),
                reason or "cancelled",
            )
            if row is None:
                return await self.get(job_id)
            job = job_from_row(row)
            await write_audit(
                conn, tenant_id=job.tenant_id, actor=actor, action="edge.job.cancel",
                subject=job.job_id, attributes={"reason": reason[:200]},
            )
        return job

    # -- devices -----------------------------------------------------------

    async def lease(
        self, device_id: str, max_jobs: int, lease_seconds: float | None = None
    ) -> list[Lease]:
        """Lease up to ``max_jobs`` jobs the device can run, within its allowance."""
        seconds = self._lease_seconds(lease_seconds)
        async with self._pool.acquire() as conn, conn.transaction():
            device = await _lock_device(conn, device_id)
            allowance = lease_allowance(device.smoothed_latency_ms, self._config)
            held = int(await conn.fetchval(_HELD, device_id))
            room = min(max(max_jobs, 1), allowance.max_leases - held)
            if room <= 0:
                return []
            caps = device.capabilities
            rows = await conn.fetch(
                _CLAIM,
                room,
                allowance.realtime_allowed,
                caps.cpu_cores,
                caps.memory_bytes,
                list(caps.sensors),
                list(caps.local_models),
                device.charging,
                device_id,
                seconds,
                request_id_var.get(),
            )
        jobs = sorted((job_from_row(r) for r in rows), key=claim_order_key)
        return [Lease(job) for job in jobs]

    def _lease_seconds(self, requested: float | None) -> float:
        if requested is None or requested <= 0:
            return self._config.lease_seconds
        return min(requested, self._config.max_lease_seconds)

    async def renew(
        self, device_id: str, job_id: str, fencing_token: int, extension_seconds: float | None
    ) -> Lease:
        seconds = self._lease_seconds(extension_seconds)
        _check_token(fencing_token)
        row = await self._pool.fetchrow(
            f"""
            UPDATE edge_jobs SET lease_expires_at = now() + make_interval(secs => $4),
                updated_at = now()
            WHERE {_HOLDS_LEASE}
            RETURNING *
            """,
            _job_uuid(job_id),
            fencing_token,
            device_id,
            seconds,
        )
        if row is None:
            raise await self._stale_lease(device_id, job_id, fencing_token)
        return Lease(job_from_row(row))

    async def complete(
        self,
        device_id: str,
        job_id: str,
        fencing_token: int,
        *,
        inline_result: bytes | None = None,
        result_blob: str | None = None,
    ) -> Job:
        if (inline_result is None) == (result_blob is None):
            raise _error(
                ErrorCode.INVALID_ARGUMENT,
                "set exactly one of inline_result and result_blob_digest",
                "result",
            )
        limit = self._config.inline_payload_max_bytes
        if inline_result is not None and len(inline_result) > limit:
            raise _error(
                ErrorCode.OUT_OF_RANGE,
                f"inline result is {len(inline_result)} bytes; the limit is {limit}: upload it",
                "inline_result",
            )
        if result_blob is not None:
            parse_blob_digest(result_blob)
        _check_token(fencing_token)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""
                UPDATE edge_jobs SET state = 'succeeded', inline_result = $4, result_blob = $5,
                    lease_expires_at = NULL, last_error = '', updated_at = now()
                WHERE {_HOLDS_LEASE}
                RETURNING *
                """,
                _job_uuid(job_id),
                fencing_token,
                device_id,
                inline_result,
                result_blob,
            )
            if row is None:
                raise await self._stale_lease(device_id, job_id, fencing_token)
            job = job_from_row(row)
            await write_audit(
                conn, tenant_id=job.tenant_id, actor=device_id, action="edge.job.complete",
                subject=job.job_id,
                attributes={"kind": job.kind, "attempts": str(job.attempts)},
            )
        return job

    async def fail(
        self, device_id: str, job_id: str, fencing_token: int, error: str, retryable: bool
    ) -> Job:
        """FAILED with a jittered exponential backoff, or DEAD_LETTER when out of attempts."""
        _check_token(fencing_token)
        storable(error, "error")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""
                UPDATE edge_jobs SET
                    state = CASE WHEN $4::boolean AND attempts < max_attempts
                                 THEN 'failed' ELSE 'dead_letter' END,
                    available_at = now() + make_interval(secs =>
                        least($6::float8, $5::float8 * power(2, greatest(attempts - 1, 0)))
                        * (0.5 + random() / 2)),
                    last_error = $7, lease_expires_at = NULL, updated_at = now()
                WHERE {_HOLDS_LEASE}
                RETURNING *
                """,
                _job_uuid(job_id),
                fencing_token,
                device_id,
                retryable,
                self._config.retry_backoff_base_seconds,
                self._config.retry_backoff_cap_seconds,
                error[:2000],
            )
            if row is None:
                raise await self._stale_lease(device_id, job_id, fencing_token)
            job = job_from_row(row)
            dead = job.state is JobState.DEAD_LETTER
            await write_audit(
                conn, tenant_id=job.tenant_id, actor=device_id,
                action="edge.job.dead_letter" if dead else "edge.job.retry",
                subject=job.job_id,
                attributes={"attempts": str(job.attempts), "last_error": error[:200]},
            )
        return job

    async def _stale_lease(
        self, device_id: str, job_id: str, fencing_token: int
    ) -> FederationError:
        """Why a conditional write matched nothing, as precisely as the row tells."""
        row = await self._pool.fetchrow(
            "SELECT state, fencing_token, leased_by, lease_expires_at <= now() AS lapsed "
            "FROM edge_jobs WHERE job_id = $1",
            _job_uuid(job_id),
        )
        if row is None:
            return _error(ErrorCode.NOT_FOUND, f"no job {job_id}", "job_id")
        current = row["fencing_token"] == fencing_token
        if current and row["leased_by"] != device_id:
            # Not a late answer of this device: the lease it names was never its own.
            return _error(ErrorCode.PERMISSION_DENIED,
                          f"job {job_id} is not leased to device {device_id}", "job_id")
        if not current:
            why = f"a newer lease holds the job (it is {row['state']})"
        elif row["state"] in (JobState.PENDING.value, JobState.FAILED.value):
            why = "the lease lapsed or was handed back; the job is queued again"
        elif row["state"] != JobState.LEASED.value:
            why = f"the job is already {row['state']}"
        else:
            why = "the lease expired; the job goes back to the queue"
        return _error(
            ErrorCode.FAILED_PRECONDITION,
            f"lease on job {job_id} with fencing token {fencing_token} is not current: {why}",
            "fencing_token",
        )


_HOLDS_LEASE = """
job_id = $1 AND fencing_token = $2 AND leased_by = $3
AND state = 'leased' AND lease_expires_at > now()
"""
"""The condition every device write must meet: the current, unexpired lease."""


async def _lock_device(conn: Conn, device_id: str) -> Device:
    row = await conn.fetchrow(
        "SELECT * FROM edge_devices WHERE device_id = $1 FOR UPDATE", device_id
    )
    if row is None:
        raise _error(
            ErrorCode.FAILED_PRECONDITION, f"device {device_id} is not registered: RegisterDevice"
        )
    device = device_from_row(row)
    if device.state is DeviceState.REVOKED:
        raise _error(ErrorCode.UNAUTHENTICATED, f"device {device_id} is revoked")
    if device.state is not DeviceState.ONLINE:
        raise _error(
            ErrorCode.FAILED_PRECONDITION,
            f"device {device_id} is {device.state.value}: RegisterDevice or Heartbeat first",
        )
    return device


def _check_token(fencing_token: int) -> None:
    """A token the broker never issued (tokens are ``bigint``s) is a malformed request,
    not a database error."""
    checked_int(fencing_token, "fencing_token", INT64_MAX)


def _job_uuid(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise _error(ErrorCode.NOT_FOUND, f"no job {job_id[:80]}", "job_id") from None


def _encode_page_token(last: Job) -> str:
    raw = f"{last.created_at.isoformat()}|{last.job_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_page_token(token: str) -> tuple[dt.datetime | None, uuid.UUID | None]:
    if not token:
        return None, None
    try:
        when, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return dt.datetime.fromisoformat(when), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise _error(ErrorCode.INVALID_ARGUMENT, "invalid page_token", "page_token") from None

