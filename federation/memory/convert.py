"""Thermal memory records ↔ protobuf, shared by the servicer and the gRPC client."""

from __future__ import annotations

from federation.memory.records import MemoryRecord, Tier
from federation.prototime import timestamp, to_datetime
from federation.v1 import thermal_memory_pb2 as pb

TIER_TO_PROTO: dict[Tier, int] = {
    Tier.HOT: pb.TEMPERATURE_TIER_HOT,
    Tier.WARM: pb.TEMPERATURE_TIER_WARM,
    Tier.COLD: pb.TEMPERATURE_TIER_COLD,
    Tier.EMBER: pb.TEMPERATURE_TIER_EMBER,
}
TIER_FROM_PROTO: dict[int, Tier] = {v: k for k, v in TIER_TO_PROTO.items()}


def record_to_proto(record: MemoryRecord) -> pb.MemoryRecord:
    return pb.MemoryRecord(
        sequence=record.sequence, tenant_id=record.tenant_id, actor=record.actor,
        action=record.action, subject=record.subject, request_id=record.request_id,
        create_time=timestamp(record.created_at),
        payload=pb.AuditPayload(attributes=dict(record.attributes), body=record.body),
        prev_hash=record.prev_hash, hash=record.hash, temperature=record.temperature,
        tier=TIER_TO_PROTO[record.tier],  # type: ignore[arg-type]
        compressed=record.compressed,
    )


def record_from_proto(message: pb.MemoryRecord) -> MemoryRecord:
    return MemoryRecord(
        sequence=message.sequence, tenant_id=message.tenant_id, actor=message.actor,
        action=message.action, subject=message.subject, request_id=message.request_id,
        created_at=to_datetime(message.create_time),
        attributes=dict(message.payload.attributes), body=message.payload.body,
        prev_hash=message.prev_hash, hash=message.hash, temperature=message.temperature,
        compressed=message.compressed,
    )

