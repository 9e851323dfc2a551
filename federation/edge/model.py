"""Plain values of the edge broker's domain, and the leasing rule.

No gRPC here: ``nodes/edge.py`` converts between these and protobuf.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from federation.config import EdgeConfig
from federation.errors import ErrorCode, FederationError


class JobType(enum.IntEnum):
    """Values equal the protobuf ``JobType`` numbers (stored as such)."""

    REALTIME = 1
    BATCH = 2


class JobState(enum.Enum):
    PENDING = "pending"
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.DEAD_LETTER, JobState.EXPIRED, JobState.CANCELLED}
)


class DeviceState(enum.Enum):
    ENROLLED = "enrolled"
    """Holds a certificate but never registered its capabilities."""
    ONLINE = "online"
    OFFLINE = "offline"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Requirements:
    """What a device must offer to run a job; empty fields impose nothing."""

    min_cpu_cores: int = 0
    min_memory_bytes: int = 0
    sensors: tuple[str, ...] = ()
    local_models: tuple[str, ...] = ()
    requires_charging: bool = False


@dataclass(frozen=True)
class Capabilities:
    cpu_cores: int = 0
    memory_bytes: int = 0
    battery_percent: int = 0
    charging: bool = False
    network_type: int = 0
    sensors: tuple[str, ...] = ()
    local_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    device_id: str
    display_name: str
    state: DeviceState
    capabilities: Capabilities
    smoothed_latency_ms: float | None
    last_heartbeat_at: dt.datetime | None
    battery_percent: int
    charging: bool
    load: float


@dataclass(frozen=True)
class JobSpec:
    """A submission. Exactly one of ``inline_payload`` / ``payload_blob`` is set."""

    tenant_id: str
    kind: str
    job_type: JobType
    requirements: Requirements = field(default_factory=Requirements)
    deadline: dt.datetime | None = None
    priority: int = 0
    inline_payload: bytes | None = None
    payload_blob: str | None = None
    max_attempts: int = 0
    """0: the configured default."""


@dataclass(frozen=True)
class Job:
    job_id: str
    tenant_id: str
    kind: str
    job_type: JobType
    state: JobState
    requirements: Requirements
    deadline: dt.datetime | None
    priority: int
    attempts: int
    max_attempts: int
    last_error: str
    leased_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    inline_payload: bytes | None
    payload_blob: str | None
    inline_result: bytes | None
    result_blob: str | None
    fencing_token: int
    lease_id: str
    lease_expires_at: dt.datetime | None


@dataclass(frozen=True)
class Lease:
    job: Job

    @property
    def fencing_token(self) -> int:
        return self.job.fencing_token

    @property
    def lease_id(self) -> str:
        return self.job.lease_id

    @property
    def expires_at(self) -> dt.datetime:
        assert self.job.lease_expires_at is not None
        return self.job.lease_expires_at


@dataclass(frozen=True)
class Allowance:
    """What the leasing rule grants one device right now."""

    max_leases: int
    """Leases the device may hold at once (already held ones count)."""
    realtime_allowed: bool


def lease_allowance(smoothed_latency_ms: float | None, config: EdgeConfig) -> Allowance:
    """The roadmap's rule made exact.

    A device whose smoothed latency is strictly above the threshold gets at
    most ``max_jobs_slow`` jobs, batch only; exactly the threshold is not
    above. A device with no measurement yet is treated as fast: the agent
    measures on its second heartbeat, seconds after registering.
    """
    slow = smoothed_latency_ms is not None and smoothed_latency_ms > config.latency_threshold_ms
    if slow:
        return Allowance(max_leases=config.max_jobs_slow, realtime_allowed=False)
    return Allowance(max_leases=config.max_jobs_fast, realtime_allowed=True)


BLOB_PREFIX = "sha256:"


def blob_digest(sha256_hex: str) -> str:
    return BLOB_PREFIX + sha256_hex


def parse_blob_digest(digest: str) -> str:
    """The 64 lowercase hex digits of ``sha256:<hex>``; INVALID_ARGUMENT otherwise."""
    hex_part = digest[len(BLOB_PREFIX) :] if digest.startswith(BLOB_PREFIX) else ""
    if len(hex_part) != 64 or any(c not in "0123456789abcdef" for c in hex_part):
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"blob digest {digest[:80]!r} is not 'sha256:' followed by 64 lowercase hex digits",
            param="blob_digest",
        )
    return hex_part
