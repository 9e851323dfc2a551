"""Device registry: capabilities, heartbeats with smoothed latency, revocation.

A heartbeat is one conditional write that only touches a device that is
online or offline: a revoked device stays revoked and a deleted one stays
deleted, whatever it sends. Round-trip latency is measured by the broker from
its own echoed timestamp (see ``HeartbeatRequest.echo_time``), so device clocks
do not matter, and smoothed with an exponentially weighted moving average.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg

from federation.config import EdgeConfig
from federation.edge.model import Capabilities, Device, DeviceState
from federation.errors import ErrorCode, FederationError


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

_HEARTBEAT = """
UPDATE edge_devices SET
    state = 'online', last_heartbeat_at = now(),
    battery_percent = $2, charging = $3, load = $4,
    smoothed_latency_ms = CASE
        WHEN $5::float8 IS NULL THEN smoothed_latency_ms
        WHEN smoothed_latency_ms IS NULL THEN $5::float8
        ELSE $6::float8 * $5::float8 + (1 - $6::float8) * smoothed_latency_ms
    END
WHERE device_id = $1 AND state IN ('online', 'offline')
RETURNING *
"""


class DeviceRegistry:
    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig) -> None:
        self._pool = pool
        self._config = config

    async def register(self, device_id: str, caps: Capabilities) -> Device:
        """Record capabilities and mark online; creates the row for a device whose
        certificate was issued directly by an operator (``pki issue --role edge``)."""
        row = await self._pool.fetchrow(
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
        return device_from_row(row)

    async def heartbeat(
        self,
        device_id: str,
        *,
        battery_percent: int,
        charging: bool,
        load: float,
        round_trip_ms: float | None,
    ) -> Device:
        sample = None if round_trip_ms is None else max(round_trip_ms, 0.0)
        row = await self._pool.fetchrow(
            _HEARTBEAT,
            device_id,
            min(max(battery_percent, 0), 100),
            charging,
            max(load, 0.0),
            sample,
            self._config.latency_smoothing,
        )
        if row is None:
            raise await self._why_not_live(device_id)
        return device_from_row(row)

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

    async def revoke(self, device_id: str) -> None:
        """Revoke for good and hand its leased jobs back to the queue, atomically."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO edge_devices (device_id, state, revoked_at)
                VALUES ($1, 'revoked', now())
                ON CONFLICT (device_id) DO UPDATE SET state = 'revoked', revoked_at = now()
                """,
                device_id,
            )
            await conn.execute(
                """
                UPDATE edge_jobs SET state = 'pending', lease_expires_at = NULL,
                    last_error = 'device revoked', updated_at = now()
                WHERE state = 'leased' AND leased_by = $1
                """,
                device_id,
            )

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
        if len(self._checked) > 100_000:  # bound memory under many devices
            self._checked.clear()
        self._checked[device_id] = self._clock()


def _revoked(device_id: str) -> FederationError:
    return FederationError(ErrorCode.UNAUTHENTICATED, f"device {device_id} is revoked")
