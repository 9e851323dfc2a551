"""An :class:`~federation.memory.sink.AuditSink` that writes through ThermalMemoryService.

Used by every node except the memory node itself. ``record`` returns only
after the memory node has committed the record, and raises a
:class:`FederationError` (UNAVAILABLE, DEADLINE_EXCEEDED, ...) otherwise, so the
caller can fail closed.

Concurrent records share one call (the gateway under load audits every answer
before it leaves): while a call is in flight, new records queue up, and the
next call (``RecordMemories``) carries all of them. When nothing is in flight a
record is sent at once: no linger, so a lone request waits for nothing but its
own commit. Each caller still awaits its own record's commit and gets the
call's error if it failed. A call refused as INVALID_ARGUMENT is retried one
record at a time, so a malformed record fails only its own caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from opentelemetry.context import Context

from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.logs import REQUEST_ID_HEADER, request_id_var
from federation.memory.convert import record_from_proto
from federation.memory.records import AuditEntry, MemoryRecord
from federation.telemetry import tracing
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_Pending = tuple[pb.RecordMemoryRequest, "asyncio.Future[MemoryRecord]", "Context | None"]
"""A record's message, its caller's future and its caller's trace (``None`` unless tracing)."""


class GrpcAuditSink:
    """``close()`` before closing the channel: it waits for the records in flight."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_seconds: float = 10.0,
                 max_batch: int = 512) -> None:
        """``max_batch``: most records in one call (the memory node's ``memory.max_batch``)."""
        self._stub = pb_grpc.ThermalMemoryServiceStub(channel)
        self._timeout = timeout_seconds
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self.calls = 0
        """Calls made (how many records share one: records / calls)."""

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        future: asyncio.Future[MemoryRecord] = asyncio.get_running_loop().create_future()
        self._queue.append((_request(entry), future, tracing.current_context()))
        if self._sender is None:
            # Its own task: a caller that gives up must not cancel the others' records.
            self._sender = asyncio.create_task(self._send_queued(), name="audit-sender")
        return await future

    async def close(self) -> None:
        """Wait until the records queued have been sent (their callers have answers)."""
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._sender)

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            records = await self._call(batch)
        except FederationError as exc:
            if exc.code is ErrorCode.INVALID_ARGUMENT and len(batch) > 1:
                for one in batch:
                    await self._send([one])
                return
            _fail(batch, exc)
            return
        except Exception as exc:  # never leave a caller waiting for ever
            log.exception("audit call failed")
            _fail(batch, FederationError(ErrorCode.UNAVAILABLE, f"audit call failed: {exc}"))
            return
        for (_, future, _), record in zip(batch, records, strict=True):
            if not future.done():
                future.set_result(record)

    async def _call(self, batch: list[_Pending]) -> list[MemoryRecord]:
        """One call for ``batch``, in the trace and under the request id of its first record
        (without an explicit id the channel interceptor would forward the sender's)."""
        self.calls += 1
        first, _, context = batch[0]
        metadata = ((REQUEST_ID_HEADER, first.request_id),) if first.request_id else None
        try:
            with tracing.continued(context):
                if len(batch) == 1:
                    one = await self._stub.RecordMemory(
                        first, timeout=self._timeout, metadata=metadata)
                    return [record_from_proto(one.record)]
                response = await self._stub.RecordMemories(
                    pb.RecordMemoriesRequest(requests=[request for request, _, _ in batch]),
                    timeout=self._timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        if len(response.records) != len(batch):
            raise FederationError(ErrorCode.INTERNAL,
                                  f"the memory node answered {len(response.records)} records "
                                  f"for {len(batch)}")
        return [record_from_proto(record) for record in response.records]


def _request(entry: AuditEntry) -> pb.RecordMemoryRequest:
    """The call's message, with the request id of the caller's context (the record may
    travel in a call made for other requests)."""
    return pb.RecordMemoryRequest(
        tenant_id=entry.tenant_id, actor=entry.actor, action=entry.action,
        subject=entry.subject,
        payload=pb.AuditPayload(attributes=dict(entry.attributes), body=entry.body),
        temperature=entry.temperature, request_id=entry.request_id or request_id_var.get(),
    )


def _fail(batch: list[_Pending], error: FederationError) -> None:
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(error)
