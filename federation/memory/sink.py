"""Where state changes are recorded: the contract every audit writer meets."""

from __future__ import annotations

from typing import Protocol

from federation.memory.records import AuditEntry, MemoryRecord


class AuditSink(Protocol):
    """Durably appends one record to thermal memory.

    ``record`` returns only once the record is committed, and raises if it
    could not be: callers rely on that to fail closed (an action whose audit
    record cannot be written does not happen).
    """

    async def record(self, entry: AuditEntry) -> MemoryRecord: ...
