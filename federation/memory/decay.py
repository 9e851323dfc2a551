"""The temperature decay job of thermal memory."""

from __future__ import annotations

from federation.memory.store import MemoryStore
from federation.periodic import PeriodicTask


def temperature_decay_job(store: MemoryStore, interval: float) -> PeriodicTask:
    """Cool every record by the configured amount and compress what went cold."""
    return PeriodicTask("thermal-memory-decay", interval, store.cool)
