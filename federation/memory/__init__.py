"""Thermal memory: the append-only, hash-chained, temperature-tiered audit log."""

from federation.memory.records import AuditEntry, MemoryRecord, Tier, tier_for
from federation.memory.sink import AuditSink

__all__ = ["AuditEntry", "AuditSink", "MemoryRecord", "Tier", "tier_for"]
