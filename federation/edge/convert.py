"""Conversions between the edge broker's protobuf messages and domain values.

Shared by the broker's servicer and the CLI (agent, operators), so both ends
read fields the same way.
"""

from __future__ import annotations

from typing import Final

from federation.edge.model import (
    Capabilities,
    Device,
    DeviceState,
    Job,
    JobSpec,
    JobState,
    JobType,
    Lease,
    Requirements,
)
from federation.errors import ErrorCode, FederationError
from federation.prototime import checked_datetime, duration, timestamp
from federation.v1 import edge_broker_pb2 as pb

_STATE_TO_PB: Final[dict[JobState, int]] = {
    JobState.PENDING: pb.JOB_STATE_PENDING,
    JobState.LEASED: pb.JOB_STATE_LEASED,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.DEAD_LETTER: pb.JOB_STATE_DEAD_LETTER,
    JobState.EXPIRED: pb.JOB_STATE_EXPIRED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
STATE_FROM_PB: Final[dict[int, JobState]] = {v: k for k, v in _STATE_TO_PB.items()}
_DEVICE_STATE_TO_PB: Final[dict[DeviceState, int]] = {
    DeviceState.ENROLLED: pb.DEVICE_STATE_OFFLINE,
    DeviceState.ONLINE: pb.DEVICE_STATE_ONLINE,
    DeviceState.OFFLINE: pb.DEVICE_STATE_OFFLINE,
    DeviceState.REVOKED: pb.DEVICE_STATE_REVOKED,
}


def job_to_pb(job: Job) -> pb.Job:
    message = pb.Job(
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        kind=job.kind,
        type=int(job.job_type),  # type: ignore[arg-type]
        state=_STATE_TO_PB[job.state],  # type: ignore[arg-type]
        requirements=requirements_to_pb(job.requirements),
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        last_error=job.last_error,
        leased_by_device=job.leased_by,
        create_time=timestamp(job.created_at),
        update_time=timestamp(job.updated_at),
    )
    if job.deadline is not None:
        message.deadline.CopyFrom(timestamp(job.deadline))
    if job.inline_payload is not None:
        message.inline_payload = job.inline_payload
    elif job.payload_blob is not None:
        message.payload_blob_digest = job.payload_blob
    if job.inline_result is not None:
        message.inline_result = job.inline_result
    elif job.result_blob is not None:
        message.result_blob_digest = job.result_blob
    return message


def lease_to_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(
        job=job_to_pb(lease.job),
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token,
        expire_time=timestamp(lease.expires_at),
    )


def requirements_to_pb(req: Requirements) -> pb.JobRequirements:
    return pb.JobRequirements(
        min_cpu_cores=req.min_cpu_cores,
        min_memory_bytes=req.min_memory_bytes,
        sensors=list(req.sensors),
        local_models=list(req.local_models),
        requires_charging=req.requires_charging,
    )


def requirements_from_pb(req: pb.JobRequirements) -> Requirements:
    return Requirements(
        min_cpu_cores=req.min_cpu_cores,
        min_memory_bytes=req.min_memory_bytes,
        sensors=tuple(req.sensors),
        local_models=tuple(req.local_models),
        requires_charging=req.requires_charging,
    )


def spec_from_pb(request: pb.SubmitJobRequest) -> JobSpec:
    if request.type not in (pb.JOB_TYPE_REALTIME, pb.JOB_TYPE_BATCH):
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "type must be JOB_TYPE_REALTIME or JOB_TYPE_BATCH",
            param="type",
        )
    which = request.WhichOneof("payload")
    return JobSpec(
        tenant_id=request.tenant_id,
        kind=request.kind,
        job_type=JobType(request.type),
        requirements=requirements_from_pb(request.requirements),
        deadline=(checked_datetime(request.deadline, "deadline")
                  if request.HasField("deadline") else None),
        priority=request.priority,
        inline_payload=request.inline_payload if which == "inline_payload" else None,
        payload_blob=request.payload_blob_digest if which == "payload_blob_digest" else None,
        max_attempts=request.max_attempts,
    )


def capabilities_from_pb(caps: pb.DeviceCapabilities) -> Capabilities:
    return Capabilities(
        cpu_cores=caps.cpu_cores,
        memory_bytes=caps.memory_bytes,
        battery_percent=caps.battery_percent,
        charging=caps.charging,
        network_type=caps.network_type,
        sensors=tuple(caps.sensors),
        local_models=tuple(caps.local_models),
    )


def device_to_pb(device: Device) -> pb.Device:
    caps = device.capabilities
    message = pb.Device(
        device_id=device.device_id,
        name=device.display_name or device.device_id,
        capabilities=pb.DeviceCapabilities(
            cpu_cores=caps.cpu_cores,
            memory_bytes=caps.memory_bytes,
            battery_percent=caps.battery_percent,
            charging=caps.charging,
            network_type=caps.network_type,  # type: ignore[arg-type]
            sensors=list(caps.sensors),
            local_models=list(caps.local_models),
        ),
        state=_DEVICE_STATE_TO_PB[device.state],  # type: ignore[arg-type]
        battery_percent=device.battery_percent,
        load=device.load,
        charging=device.charging,
    )
    if device.smoothed_latency_ms is not None:
        message.smoothed_latency.CopyFrom(duration(device.smoothed_latency_ms / 1000))
    if device.last_heartbeat_at is not None:
        message.last_heartbeat_time.CopyFrom(timestamp(device.last_heartbeat_at))
    return message
