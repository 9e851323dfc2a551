"""Device registry: capabilities, heartbeats with smoothed latency, revocation.

Every change of a device's stored state is audited in the transaction that
makes it (:func:`~federation.edge.audit.write_audit`): a registration
(``edge.device.register``, with the previous state and the capabilities that
changed), a heartbeat that brings an offline device back (``edge.device.online``;
the reaper audits the way down, ``edge.device.offline``) and a revocation. A
heartbeat that only refreshes an online device's battery, load and latency is
not audited: it is telemetry, several a minute per device, and would drown the
record.

A heartbeat is one conditional write that only touches a device that is
online or offline: a revoked device stays revoked and a deleted one stays
deleted, whatever it sends. Round-trip latency is measured by the broker from
its own echoed timestamp (see ``HeartbeatRequest.echo_time``), so device clocks
do not matter, and smoothed with an exponentially weighted moving average.

Heartbeats are applied in batches: calls that arrive while a batch is being
written join the next one, which is one ``UPDATE … FROM unnest(…)`` with the
same condition for every row; each caller gets its own row (or none, and the
reason). A device appears at most once per batch, so its latency samples are
smoothed in the order they arrived.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg

from federation.config import EdgeConfig
from federation.edge.audit import write_audit
from federation.edge.fields import (
    INT16_MAX,
    INT32_MAX,
    INT64_MAX,
    checked_int,
)
from federation.edge.model import Capabilities, Device, DeviceState
from federation.errors import ErrorCode, FederationError
from federation.fields import storable_all
from federation.logs import request_id_var
from federation.pki import PKIError, validate_name


def checked_device_name(name: str) -> str:
    """``name`` when it can name a device (its certificate's name); INVALID_ARGUMENT on
    ``name`` otherwise."""
    try:
        return validate_name(name)
    except PKIError as exc:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, str(exc), param="name") from None


def device_from_row(row: asyncpg.Record) -> Device:
    return Device(
        device_id=row["device_id"],
        display_name=row["display_name"],
        state=DeviceState(row["state"]),
        capabilities=Capabilities(
            cpu_cores=row["cpu_cores"],
            memory_bytes=row["memory_bytes"],
            battery_percent=row["battery_percent"],
            charging=row["charging"],
            network_type=row["network_type"],
            sensors=tuple(row["sensors"]),
            local_models=tuple(row["local_models"]),
        ),
        smoothed_latency_ms=row["smoothed_latency_ms"],
        last_heartbeat_at=row["last_heartbeat_at"],
        battery_percent=row["battery_percent"],
        charging=row["charging"],
        load=row["load"],
    )


_REGISTER = """
INSERT INTO edge_devices AS d (device_id, state, cpu_cores, memory_bytes, network_type, sensors,
    local_models, battery_percent, charging, last_heartbeat_at)
VALUES ($1, 'online', $2, $3, $4, $5, $6, $7, $8, now())
ON CONFLICT (device_id) DO UPDATE SET
    state = 'online', cpu_cores = $2, memory_bytes = $3, network_type = $4, sensors = $5,
    local_models = $6, battery_percent = $7, charging = $8, last_heartbeat_at = now()
WHERE d.state <> 'revoked'
RETURNING *
"""

_HEARTBEAT_BATCH = """
WITH live AS (
    -- Locked first, so ``state`` is the one this write replaces (a reaper that marked
    -- the device offline after this statement's snapshot is seen, not missed).
    SELECT device_id, state FROM edge_devices
    WHERE device_id = ANY($1::text[]) AND state IN ('online', 'offline')
    ORDER BY device_id
    FOR UPDATE
), beat AS (
    UPDATE edge_devices AS d SET
        state = 'online', last_heartbeat_at = now(),
        battery_percent = b.battery_percent, charging = b.charging, load = b.load,
        smoothed_latency_ms = CASE
            WHEN b.sample IS NULL THEN d.smoothed_latency_ms
            WHEN d.smoothed_latency_ms IS NULL THEN b.sample
            ELSE $6::float8 * b.sample + (1 - $6::float8) * d.smoothed_latency_ms
        END
    FROM unnest($1::text[], $2::integer[], $3::boolean[], $4::float8[], $5::float8[],
                $7::text[], $8::text[])
        AS b(device_id, battery_percent, charging, load, sample, actor, request_id)
    JOIN live ON live.device_id = b.device_id
    WHERE d.device_id = b.device_id AND d.state IN ('online', 'offline')
    RETURNING d.*, live.state AS previous_state, b.actor AS beat_actor,
        b.request_id AS beat_request_id
), audited AS (
    INSERT INTO edge_audit_outbox (tenant_id, actor, action, subject, attributes, request_id)
    SELECT '', beat_actor, 'edge.device.online', device_id,
           jsonb_build_object('previous_state', previous_state), beat_request_id
    FROM beat WHERE previous_state = 'offline'
)
SELECT * FROM beat
"""

_RELEASE_REVOKED = """
UPDATE edge_jobs SET
    state = CASE WHEN attempts >= max_attempts THEN 'dead_letter' ELSE 'pending' END,
    lease_expires_at = NULL, available_at = now(), last_error = 'device revoked',
    updated_at = now()
WHERE state = 'leased' AND leased_by = $1
RETURNING tenant_id, job_id, state, attempts
"""

_MAX_BATCH = 512
"""Most heartbeats written by one statement."""

_BATCH_LINGER_SECONDS = 0.002
"""How long a batch waits for company before it is written. Latency samples do not
include it: the echoed time is taken when the reply is built, after the write."""

_DEADLOCK_RETRIES = 3
"""A batch locks many rows; should it deadlock with another writer (the reaper's
offline sweep, another broker's batch), PostgreSQL aborts it and it is retried."""


@dataclass
class _Beat:
    device_id: str
    battery_percent: int
    charging: bool
    load: float
    sample: float | None
    actor: str
    request_id: str
    """The caller's, for the audit record of a device coming back online."""
    reply: asyncio.Future[asyncpg.Record | None] = field(repr=False)


def _check_capabilities(caps: Capabilities) -> None:
    checked_int(caps.cpu_cores, "cpu_cores", INT32_MAX)
    checked_int(caps.memory_bytes, "memory_bytes", INT64_MAX)
    # An open enum: a newer device may send a type this broker does not know yet.
    checked_int(caps.network_type, "network_type", INT16_MAX)
    storable_all(caps.sensors, "sensors")
    storable_all(caps.local_models, "local_models")


_CAPABILITY_COLUMNS = ("cpu_cores", "memory_bytes", "network_type", "sensors", "local_models")
"""What a registration records about a device (battery and charging are telemetry)."""


def _registration_audit(before: asyncpg.Record | None, after: asyncpg.Record) -> dict[str, str]:
    """The record of a registration: the state it replaced ("" for a new device), which
    capabilities changed, and the capabilities now stored."""
    attributes = {"previous_state": before["state"] if before is not None else ""}
    changed = [c for c in _CAPABILITY_COLUMNS if before is None or before[c] != after[c]]
    attributes["changed"] = ",".join(changed)
    for column in _CAPABILITY_COLUMNS:
        value = after[column]
        attributes[column] = ",".join(value) if isinstance(value, list) else str(value)
    return attributes


class DeviceRegistry:
    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig) -> None:
        self._pool = pool
        self._config = config
        self._beats: collections.deque[_Beat] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None

    async def register(
        self, device_id: str, caps: Capabilities, *, actor: str | None = None
    ) -> Device:
        """Record capabilities and mark online; creates the row for a device whose
        certificate was issued directly by an operator (``pki issue --role edge``).

        Audited (``edge.device.register``; ``actor``: the caller, by default the device
        id) in the same transaction: no registration is stored unrecorded."""
        _check_capabilities(caps)
        async with self._pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(
                "SELECT * FROM edge_devices WHERE device_id = $1 FOR UPDATE", device_id
            )
            row = await conn.fetchrow(
                _REGISTER,
                device_id,
                caps.cpu_cores,
                caps.memory_bytes,
                caps.network_type,
                sorted(set(caps.sensors)),
                sorted(set(caps.local_models)),
                min(max(caps.battery_percent, 0), 100),
                caps.charging,
            )
            if row is None:
                raise FederationError(ErrorCode.UNAUTHENTICATED, f"device {device_id} is revoked")
            await write_audit(
                conn, tenant_id="", actor=actor or device_id, action="edge.device.register",
                subject=device_id, attributes=_registration_audit(before, row),
            )
        return device_from_row(row)

    async def heartbeat(
        self,
        device_id: str,
        *,
        battery_percent: int,
        charging: bool,
        load: float,
        round_trip_ms: float | None,
        actor: str | None = None,
    ) -> Device:
        """Mark the device online with its battery, load and latency sample.

        Refused (UNAUTHENTICATED) for a revoked device, FAILED_PRECONDITION for
        an unknown one; neither is created or revived. A device that was offline
        comes back online audited (``edge.device.online``; ``actor``: the caller, by
        default the device id), in the same statement.
        """
        if not math.isfinite(load):  # NaN would sit in the registry and defeat comparisons
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"load must be a finite number; got {load}", param="load")
        beat = _Beat(
            device_id,
            min(max(battery_percent, 0), 100),
            charging,
            max(load, 0.0),
            None if round_trip_ms is None else max(round_trip_ms, 0.0),
            actor or device_id,
            request_id_var.get(),
            asyncio.get_running_loop().create_future(),
        )
        self._beats.append(beat)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._write_beats())
        row = await beat.reply
        if row is None:
            raise await self._why_not_live(device_id)
        return device_from_row(row)

    async def _write_beats(self) -> None:
        """Write queued heartbeats, a batch at a time, until none are left."""
        while self._beats:
            if len(self._beats) < _MAX_BATCH:
                await asyncio.sleep(_BATCH_LINGER_SECONDS)
            batch: dict[str, _Beat] = {}
            later: list[_Beat] = []
            while self._beats and len(batch) < _MAX_BATCH:
                beat = self._beats.popleft()
                if beat.reply.done():  # the caller went away
                    continue
                if beat.device_id in batch:  # once per batch, in arrival order
                    later.append(beat)
                else:
                    batch[beat.device_id] = beat
            self._beats.extendleft(reversed(later))
            if batch:
                await self._write_batch(list(batch.values()))

    async def _write_batch(self, batch: list[_Beat]) -> None:
        try:
            rows = await self._update(batch)
        except BaseException as exc:
            for beat in batch:
                if beat.reply.done():
                    continue
                if isinstance(exc, Exception):
                    beat.reply.set_exception(exc)
                else:
                    beat.reply.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        by_device = {row["device_id"]: row for row in rows}
        for beat in batch:
            if not beat.reply.done():
                beat.reply.set_result(by_device.get(beat.device_id))

    async def _update(self, batch: list[_Beat]) -> list[asyncpg.Record]:
        for attempt in range(_DEADLOCK_RETRIES + 1):
            try:
                rows: list[asyncpg.Record] = await self._pool.fetch(
                    _HEARTBEAT_BATCH,
                    [b.device_id for b in batch],
                    [b.battery_percent for b in batch],
                    [b.charging for b in batch],
                    [b.load for b in batch],
                    [b.sample for b in batch],
                    self._config.latency_smoothing,
                    [b.actor for b in batch],
                    [b.request_id for b in batch],
                )
                return rows
            except asyncpg.DeadlockDetectedError:
                if attempt == _DEADLOCK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    async def _why_not_live(self, device_id: str) -> FederationError:
        state = await self._pool.fetchval(
            "SELECT state FROM edge_devices WHERE device_id = $1", device_id
        )
        if state == DeviceState.REVOKED.value:
            return FederationError(ErrorCode.UNAUTHENTICATED, f"device {device_id} is revoked")
        return FederationError(
            ErrorCode.FAILED_PRECONDITION,
            f"device {device_id} is not registered: call RegisterDevice first",
        )

    async def get(self, device_id: str) -> Device:
        row = await self._pool.fetchrow(
            "SELECT * FROM edge_devices WHERE device_id = $1", device_id
        )
        if row is None:
            raise FederationError(ErrorCode.NOT_FOUND, f"no device {device_id}")
        return device_from_row(row)

    async def revoke(self, device_id: str, *, actor: str) -> bool:
        """Revoke for good and hand its leased jobs back to the queue, atomically, with
        the revocation (and any job it dead-letters) audited in the same transaction.

        A handed-back lease counts as a spent attempt, as when it lapses (the reaper's
        rule): a job with no attempt left is dead-lettered, not leased past
        ``max_attempts``. A name no device has enrolled under is revoked too (an
        unused enrollment token for it can then no longer enroll); returns whether a
        device had enrolled."""
        checked_device_name(device_id)
        async with self._pool.acquire() as conn, conn.transaction():
            known = await conn.fetchval(
                "SELECT true FROM edge_devices WHERE device_id = $1 FOR UPDATE", device_id)
            await conn.execute(
                """
                INSERT INTO edge_devices (device_id, state, revoked_at)
                VALUES ($1, 'revoked', now())
                ON CONFLICT (device_id) DO UPDATE SET state = 'revoked', revoked_at = now()
                """,
                device_id,
            )
            released = await conn.fetch(_RELEASE_REVOKED, device_id)
            await write_audit(
                conn, tenant_id="", actor=actor, action="edge.device.revoke",
                subject=device_id,
                attributes={"had_enrolled": str(bool(known)).lower(),
                            "released_leases": str(len(released))},
            )
            for job in released:
                dead = job["state"] == "dead_letter"
                await write_audit(
                    conn, tenant_id=job["tenant_id"], actor=actor,
                    action="edge.job.dead_letter" if dead else "edge.job.release",
                    subject=str(job["job_id"]),
                    attributes={"attempts": str(job["attempts"]),
                                "last_error": "device revoked"},
                )
        return bool(known)

    async def is_revoked(self, device_id: str) -> bool:
        state = await self._pool.fetchval(
            "SELECT state FROM edge_devices WHERE device_id = $1", device_id
        )
        return bool(state == DeviceState.REVOKED.value)


class RevocationCache:
    """Remembers "not revoked" for a short time; "revoked" is remembered for good.

    The TTL bounds how long after ``federation edge revoke`` a broker process
    may still serve the device (0 disables caching).
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._ttl = ttl_seconds
        self._clock = clock
        self._checked: dict[str, float] = {}
        self._revoked: set[str] = set()

    async def ensure_not_revoked(self, device_id: str) -> None:
        if device_id in self._revoked:
            raise _revoked(device_id)
        checked = self._checked.get(device_id)
        if checked is not None and self._clock() - checked < self._ttl:
            return
        if await self._registry.is_revoked(device_id):
            self._revoked.add(device_id)
            self._checked.pop(device_id, None)
            raise _revoked(device_id)
        self.note_live(device_id)

    def ensure_not_known_revoked(self, device_id: str) -> None:
        """The local half of :meth:`ensure_not_revoked`, for calls whose own
        statement refuses a revoked device anyway (a heartbeat)."""
        if device_id in self._revoked:
            raise _revoked(device_id)

    def note_live(self, device_id: str) -> None:
        """The database just showed the device not revoked."""
        if len(self._checked) > 100_000:  # bound memory under many devices
            self._checked.clear()
        self._checked[device_id] = self._clock()

    def note_revoked(self, device_id: str) -> None:
        self._revoked.add(device_id)
        self._checked.pop(device_id, None)


def _revoked(device_id: str) -> FederationError:
    return FederationError(ErrorCode.UNAUTHENTICATED, f"device {device_id} is revoked")
