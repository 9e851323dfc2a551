"""An :class:`~federation.memory.sink.AuditSink` that writes through ThermalMemoryService.

Used by every node except the memory node itself. ``record`` returns only
after the memory node has committed the record, and raises a
:class:`FederationError` (UNAVAILABLE, DEADLINE_EXCEEDED, ...) otherwise, so the
caller can fail closed.

Records travel over one long-lived ``StreamMemories`` stream, opened at the first
record and again after a failure: a batch is one message each way, where a call
costs its setup on both sides (0.23 against 0.50 ms to an idle node, 0.08 against
0.26 ms back to back; issue 18). Concurrent records share a batch: while a batch
is in flight, new records queue up, and the next batch carries all of them. When
nothing is in flight a record is sent at once: no linger, so a lone request waits
for nothing but its own commit. Each caller still awaits its own record's commit
and gets its batch's error if it failed. A batch refused as INVALID_ARGUMENT is
sent again one record at a time, so a malformed record fails only its own caller.
A batch unanswered within the timeout ends the stream (its records' callers get
DEADLINE_EXCEEDED, every other waiting caller UNAVAILABLE): the next record opens
a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging

import grpc
from opentelemetry.context import Context

from federation.errors import ErrorCode, FederationError, call_error_from_proto
from federation.logs import request_id_var
from federation.memory.convert import record_from_proto
from federation.memory.records import AuditEntry, MemoryRecord
from federation.multiplexed import CurrentStream, MultiplexedCall
from federation.periodic import TaskSet
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
        """``max_batch``: most records in one batch (the memory node's ``memory.max_batch``)."""
        stub = pb_grpc.ThermalMemoryServiceStub(channel)
        self._retiring = TaskSet()
        """Streams replaced after a certificate renewal, closing once their batches are answered."""
        self._streams = CurrentStream(
            channel, lambda epoch: _AuditStream(stub.StreamMemories(), epoch),
            lambda replaced: self._retiring.spawn(replaced.close(self._timeout)))
        self._timeout = timeout_seconds
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0
        """Batches sent (how many records share one: records / batches)."""

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        future: asyncio.Future[MemoryRecord] = asyncio.get_running_loop().create_future()
        self._queue.append((_request(entry), future, tracing.current_context()))
        if self._sender is None:
            # Its own task: a caller that gives up must not cancel the others' records.
            # An empty context: the stream it may open outlives this request (no request
            # id or trace of this one on it; each batch carries its own).
            self._sender = asyncio.create_task(self._send_queued(), name="audit-sender",
                                               context=contextvars.Context())
        return await future

    async def close(self) -> None:
        """Wait until the records queued have been sent and answered, then end the stream."""
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._sender)
        await self._streams.close(self._timeout)
        await self._retiring.wait()

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
            records = await self._write(batch)
        except FederationError as exc:
            if exc.code is ErrorCode.INVALID_ARGUMENT and len(batch) > 1:
                for one in batch:
                    await self._send([one])
                return
            _fail(batch, _of_own_record(exc) if len(batch) == 1 else exc)
            return
        except Exception as exc:  # never leave a caller waiting for ever
            log.exception("audit batch failed")
            _fail(batch, FederationError(ErrorCode.UNAVAILABLE, f"audit call failed: {exc}"))
            return
        for (_, future, _), record in zip(batch, records, strict=True):
            if not future.done():
                future.set_result(record)

    async def _write(self, batch: list[_Pending]) -> list[MemoryRecord]:
        """``batch`` over the stream (opened if need be), in the trace of its first record."""
        self.batches += 1
        stream = self._streams.get()
        with tracing.continued(batch[0][2]):
            trace_context = dict(tracing.trace_metadata())
        message = pb.StreamMemoriesRequest(requests=[request for request, _, _ in batch],
                                           trace_context=trace_context)
        return await stream.send(message, self._timeout)


class _AuditStream(MultiplexedCall):
    """One StreamMemories call: batches written with an id, answers matched by it."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.StreamMemoriesRequest,
                                                       pb.StreamMemoriesResponse],
                 epoch: int) -> None:
        self._waiting: dict[int, asyncio.Future[pb.StreamMemoriesResponse]] = {}
        super().__init__(call, epoch, what="audit stream", peer="memory node")

    async def send(self, message: pb.StreamMemoriesRequest, timeout_seconds: float
                   ) -> list[MemoryRecord]:
        message.batch_id = batch_id = next(self._ids)
        answer = self._waiting[batch_id] = asyncio.get_running_loop().create_future()
        await self._write(message)
        try:
            async with asyncio.timeout(timeout_seconds):
                response = await answer
        except TimeoutError:
            self._end(FederationError(ErrorCode.UNAVAILABLE,
                                      "the audit stream was reset after a batch went "
                                      f"unanswered for {timeout_seconds:g} s"))
            raise FederationError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"the memory node did not answer within {timeout_seconds:g} s") from None
        if response.HasField("error"):
            raise call_error_from_proto(response.error)
        if len(response.records) != len(message.requests):
            raise FederationError(ErrorCode.INTERNAL,
                                  f"the memory node answered {len(response.records)} records "
                                  f"for {len(message.requests)}")
        return [record_from_proto(record) for record in response.records]

    def _route(self, response: pb.StreamMemoriesResponse) -> None:
        answer = self._waiting.pop(response.batch_id, None)
        if answer is not None and not answer.done():
            answer.set_result(response)

    def _fail_open(self, error: FederationError) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(error)
        self._waiting.clear()


def _request(entry: AuditEntry) -> pb.RecordMemoryRequest:
    """The call's message, with the request id of the caller's context (the record may
    travel in a call made for other requests)."""
    return pb.RecordMemoryRequest(
        tenant_id=entry.tenant_id, actor=entry.actor, action=entry.action,
        subject=entry.subject,
        payload=pb.AuditPayload(attributes=dict(entry.attributes), body=entry.body),
        temperature=entry.temperature, request_id=entry.request_id or request_id_var.get(),
    )


def _of_own_record(error: FederationError) -> FederationError:
    """A one-record batch's error naming the field of that record (``action``), not of
    the batch (``requests[0].action``)."""
    prefix = "requests[0]."
    if not error.param or not error.param.startswith(prefix):
        return error
    return FederationError(error.code, error.message, param=error.param.removeprefix(prefix),
                           retry_after_seconds=error.retry_after_seconds)


def _fail(batch: list[_Pending], error: FederationError) -> None:
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(error)
