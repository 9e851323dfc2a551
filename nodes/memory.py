"""ThermalMemoryService: a thin adapter over :class:`federation.memory.store.MemoryStore`.

Tenant scoping: ``tenant_id`` names the tenant whose records are read. The
gateway, the guardian and operators may name any tenant; only operators
(role ``admin``) may leave it empty to mean every tenant.

Audit checkpoints (issue #7): when a guardian is configured (``peers.guardian``),
the node asks it to sign the chain head every N records or T seconds (a failure
is logged and retried, never blocks an append), and ``VerifyChain`` also checks
the chain against every signed checkpoint, so a rewrite of the whole chain by
the database owner is still caught. See ``federation/guardian/chain_checks.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from opentelemetry.trace import SpanKind

from federation.errors import (
    INTERNAL_MESSAGE,
    ErrorCode,
    FederationError,
    call_error_to_proto,
)
from federation.fields import bounded, storable, storable_map
from federation.guardian.chain_checks import (
    GuardianCheckpoints,
    guardian_keys,
    verify_with_checkpoints,
)
from federation.guardian.checkpoints import CheckpointScheduler, GuardianKeys
from federation.interceptor import current_caller, recheck_caller
from federation.logs import request_id_var
from federation.memory.convert import TIER_FROM_PROTO, record_to_proto
from federation.memory.decay import temperature_decay_job
from federation.memory.records import AuditEntry, MemoryRecord, Tier
from federation.memory.restore_event import RESTORE_ACTION, RestoreClaim, RestoreVerifier
from federation.memory.store import MemoryStore, SearchQuery
from federation.periodic import TaskSet, cancel_and_wait
from federation.pki import PKIPaths
from federation.prototime import checked_datetime
from federation.server import ServiceRegistration
from federation.telemetry import tracing
from federation.tenancy import MAX_TENANT_ID
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc
from nodes.runtime import NodeRuntime

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ThermalMemoryService"].full_name
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_TENANT_READERS = frozenset({"admin", "gateway", "guardian"})
STREAM_BATCH_SPAN = "thermal_memory.stream_batch"
"""The span of one batch of a StreamMemories stream (the stream's own span lasts as long
as its writer keeps it open)."""
_END = object()
"""On a stream's queue of answers: the writer closed its side and every batch read has
been answered."""
_DRAIN = object()
"""On a stream's queue of answers: the node is stopping."""

MAX_REQUEST_ID_CHARS = 128
"""The longest request id a record holds: the longest the federation accepts from a
caller (``federation.logs.clean_request_id``). Like ``tenant_id`` (at most
:data:`~federation.tenancy.MAX_TENANT_ID` characters, as everywhere), it is indexed, and
PostgreSQL refuses an index row past 2704 bytes."""

RECORDED_BY = "recorded_by"
"""The attribute naming the node that wrote a record (its certificate's SPIFFE id), set
by this node over whatever the writer sent under that name."""


def audit_entry(request: pb.RecordMemoryRequest, param_prefix: str = "") -> AuditEntry:
    """The entry ``request`` asks to append; INVALID_ARGUMENT naming the bad field."""
    if not request.action.strip():  # a blank action names nothing a search could find
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "action is required",
                              param=param_prefix + "action")
    if request.action == RESTORE_ACTION:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"action {RESTORE_ACTION!r} is reserved for `federation "
                              "restore`", param=param_prefix + "action")
    if request.HasField("temperature") and request.temperature > 100:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "temperature is 0 to 100",
                              param=param_prefix + "temperature")
    # Checked before the entry joins a group commit, whose one statement it would fail
    # for every record sharing it: a NUL, or a value too long for its index's row.
    for name in ("actor", "action", "subject"):
        storable(getattr(request, name), param_prefix + name)
    bounded(request.tenant_id, param_prefix + "tenant_id", MAX_TENANT_ID)
    bounded(request.request_id, param_prefix + "request_id", MAX_REQUEST_ID_CHARS)
    storable_map(request.payload.attributes, param_prefix + "payload.attributes")
    writer = current_caller().spiffe_id
    # The writer's own identity, from its certificate: ``actor`` is what the writer says
    # acted, and any role that may write could name anyone there.
    attributes = {**request.payload.attributes, RECORDED_BY: writer}
    return AuditEntry(
        actor=request.actor or writer, action=request.action,
        tenant_id=request.tenant_id, subject=request.subject,
        attributes=attributes, body=request.payload.body,
        temperature=request.temperature if request.HasField("temperature") else None,
        request_id=request.request_id,
    )


def tenant_scope(tenant_id: str) -> str | None:
    """The tenant the caller may read: ``None`` (all) only for operators."""
    role = current_caller().role
    if role not in _TENANT_READERS:
        raise FederationError(ErrorCode.PERMISSION_DENIED,
                              f"role {role!r} may not read thermal memory")
    if tenant_id:
        return storable(tenant_id, "tenant_id")
    if role == "admin":
        return None
    raise FederationError(ErrorCode.INVALID_ARGUMENT, "tenant_id is required", param="tenant_id")


class ThermalMemoryServicer(pb_grpc.ThermalMemoryServiceServicer):
    def __init__(
        self, store: MemoryStore, *, guardian: GuardianCheckpoints | None = None,
        scheduler: CheckpointScheduler | None = None,
        guardian_keys: Callable[[], GuardianKeys | None] = lambda: None,
        max_batch: int = 512, stream_max_batches_in_flight: int = 8,
    ) -> None:
        """``guardian``: where the signed checkpoints are (``None``: no guardian
        configured, chain-only verification); ``scheduler`` hears of every append;
        ``max_batch``: most records one RecordMemories call or streamed batch may carry;
        ``stream_max_batches_in_flight``: batches of one stream appended at once."""
        self._store = store
        self._max_batch = max_batch
        self._stream_window = max(1, stream_max_batches_in_flight)
        self._streams: set[asyncio.Queue[object]] = set()
        """The answers of each open StreamMemories stream (told when the node drains)."""
        self._guardian = guardian
        self._scheduler = scheduler
        self._guardian_keys = guardian_keys

    async def RecordMemory(
        self, request: pb.RecordMemoryRequest, context: Context
    ) -> pb.RecordMemoryResponse:
        record = await self._store.record(audit_entry(request))
        if self._scheduler is not None:
            self._scheduler.observe(record.sequence)
        return pb.RecordMemoryResponse(record=record_to_proto(record))

    async def RecordMemories(
        self, request: pb.RecordMemoriesRequest, context: Context
    ) -> pb.RecordMemoriesResponse:
        records = await self._record_batch(request.requests)
        return pb.RecordMemoriesResponse(records=[record_to_proto(r) for r in records])

    async def StreamMemories(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamMemoriesRequest], context: Context
    ) -> AsyncIterator[pb.StreamMemoriesResponse]:
        # Each batch is appended in a task of its own and answered when committed, so
        # the batches in flight share the chain writer's commits. The interceptor
        # authenticated the caller once, for the stream; the tasks inherit its identity.
        answers: asyncio.Queue[object] = asyncio.Queue()
        appending = TaskSet()
        reader = asyncio.create_task(self._read_batches(request_iterator, answers, appending))
        self._streams.add(answers)
        try:
            while (answer := await answers.get()) is not _END:
                if answer is _DRAIN:
                    # Stop reading; answer what is being appended; then tell the writer
                    # to reconnect (its batches not read yet fail there, unstored).
                    await cancel_and_wait(reader)
                    await appending.wait()
                    while not answers.empty():
                        if isinstance(left := answers.get_nowait(), pb.StreamMemoriesResponse):
                            yield left
                    raise FederationError(ErrorCode.UNAVAILABLE,
                                          "the memory node is shutting down; reconnect",
                                          retry_after_seconds=1.0)
                assert isinstance(answer, pb.StreamMemoriesResponse)
                yield answer
        finally:
            self._streams.discard(answers)
            await cancel_and_wait(reader)
            appending.cancel()

    def drain(self) -> None:
        """End the open StreamMemories streams (once their batches in flight are
        answered): the node is stopping, and an idle stream would otherwise hold the
        server's graceful stop for its whole grace period."""
        for answers in self._streams:
            answers.put_nowait(_DRAIN)

    async def _read_batches(self, batches: AsyncIterator[pb.StreamMemoriesRequest],
                            answers: asyncio.Queue[object],
                            appending: TaskSet) -> None:
        window = asyncio.Semaphore(self._stream_window)

        async def answer(batch: pb.StreamMemoriesRequest) -> None:
            try:
                answers.put_nowait(await self._streamed_batch(batch))
            finally:
                window.release()

        try:
            async for batch in batches:
                await window.acquire()
                appending.spawn(answer(batch))
            await appending.wait()  # cancelling this wait does not cancel them
        finally:
            answers.put_nowait(_END)

    async def _streamed_batch(self, batch: pb.StreamMemoriesRequest
                              ) -> pb.StreamMemoriesResponse:
        """The batch's answer: its records, or the error a call would have ended with."""
        if batch.requests:
            request_id_var.set(batch.requests[0].request_id)
        carrier = dict(batch.trace_context) if tracing.enabled() else None
        with tracing.span(STREAM_BATCH_SPAN, kind=SpanKind.SERVER, carrier=carrier):
            try:
                recheck_caller()  # the stream may outlive the writer's certificate
                records = await self._record_batch(batch.requests)
            except FederationError as exc:
                return pb.StreamMemoriesResponse(batch_id=batch.batch_id,
                                                 error=call_error_to_proto(exc))
            except Exception:
                log.exception("a streamed batch failed")
                error = FederationError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)
                return pb.StreamMemoriesResponse(batch_id=batch.batch_id,
                                                 error=call_error_to_proto(error))
        return pb.StreamMemoriesResponse(batch_id=batch.batch_id,
                                         records=[record_to_proto(r) for r in records])

    async def _record_batch(self, requests: Sequence[pb.RecordMemoryRequest]
                            ) -> list[MemoryRecord]:
        count = len(requests)
        if not 1 <= count <= self._max_batch:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"requests holds 1 to {self._max_batch} records, not {count}",
                                  param="requests")
        entries = [audit_entry(item, f"requests[{n}].") for n, item in enumerate(requests)]
        records = await self._store.record_many(entries)
        if self._scheduler is not None:
            self._scheduler.observe(records[-1].sequence)
        return records

    async def ReadMemory(
        self, request: pb.ReadMemoryRequest, context: Context
    ) -> pb.ReadMemoryResponse:
        tenant = tenant_scope(request.tenant_id)
        if request.sequence < 1:  # sequences start at 1: no record could be found
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "sequence is a record sequence, 1 or more", param="sequence")
        record = await self._store.read(tenant, request.sequence)
        return pb.ReadMemoryResponse(record=record_to_proto(record))

    async def SearchMemory(
        self, request: pb.SearchMemoryRequest, context: Context
    ) -> pb.SearchMemoryResponse:
        page = await self._store.search(SearchQuery(
            tenant_id=tenant_scope(request.tenant_id),
            action_prefix=storable(request.action_prefix, "action_prefix"),
            request_id=storable(request.request_id, "request_id"),
            actor=storable(request.actor, "actor"),
            start_time=_search_time(request, "start_time"),
            end_time=_search_time(request, "end_time"),
            tier=_search_tier(request.tier), page_size=request.page_size,
            page_token=request.page_token,
        ))
        return pb.SearchMemoryResponse(records=[record_to_proto(r) for r in page.records],
                                       next_page_token=page.next_page_token)

    async def VerifyChain(
        self, request: pb.VerifyChainRequest, context: Context
    ) -> pb.VerifyChainResponse:
        _check_range(request.from_sequence, request.to_sequence)
        checkpoints = await self._guardian.list_all() if self._guardian is not None else None
        report = await verify_with_checkpoints(
            self._store, checkpoints, self._guardian_keys(), request.from_sequence,
            request.to_sequence,
        )
        response = pb.VerifyChainResponse(
            intact=report.intact, records_checked=report.records_checked,
            first_bad_sequence=report.first_bad_sequence, problem=report.problem,
            checkpoint_signatures_checked=report.signatures_checked,
        )
        if report.last_checkpoint_sequence is not None:
            response.last_checkpoint_sequence = report.last_checkpoint_sequence
        response.restores.extend(
            restore_to_proto(claim) for claim in report.restores)
        return response

    async def GetChainLink(
        self, request: pb.GetChainLinkRequest, context: Context
    ) -> pb.GetChainLinkResponse:
        if request.sequence < 1:
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  "sequence is a record sequence, 1 or more", param="sequence")
        # The head first: a record appended between the two reads then counts as beyond
        # the head, never as one missing below it.
        head = await self._store.head()
        digest = await self._store.hash_at(request.sequence) if request.sequence <= head else None
        return pb.GetChainLinkResponse(head_sequence=head, hash=digest or b"")


def _search_time(request: pb.SearchMemoryRequest, field: str) -> dt.datetime | None:
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    return checked_datetime(getattr(request, field), field)


def _search_tier(tier: int) -> Tier | None:
    """The tier to filter on; ``None`` for UNSPECIFIED. A number the proto does not
    define is refused: ignoring it would answer with records of every tier."""
    if tier == pb.TEMPERATURE_TIER_UNSPECIFIED:
        return None
    if tier not in TIER_FROM_PROTO:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"tier {tier} is not a tier",
                              param="tier")
    return TIER_FROM_PROTO[tier]


def _check_range(from_sequence: int, to_sequence: int) -> None:
    if from_sequence < 0 or to_sequence < 0:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              "from_sequence and to_sequence are record sequences (1 or "
                              "more), or 0 for the start and the head of the chain")
    if to_sequence and from_sequence > to_sequence:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"from_sequence {from_sequence} is after to_sequence "
                              f"{to_sequence}")


def restore_to_proto(claim: RestoreClaim) -> pb.ChainRestore:
    message = pb.ChainRestore(
        sequence=claim.event_sequence, restored_by=claim.restored_by,
        backup_id=claim.backup_id, backup_time=claim.backup_time,
        backup_sequence=claim.backup_sequence, backup_hash=claim.backup_hash,
        lost_from=claim.lost_from, lost_to=claim.lost_to, lost_count=claim.lost_count,
        guardian_checkpoint_sequence=claim.guardian_checkpoint_sequence,
    )
    if claim.restore_time is not None:
        message.restore_time.FromDatetime(claim.restore_time)
    return message


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    config = runtime.settings.memory
    store = MemoryStore(runtime.require_database().pool, config,
                        restore_verifier=_restore_verifier(runtime))
    await store.start()
    runtime.cleanup.push_async_callback(store.stop)
    decay = temperature_decay_job(store, config.decay_interval_seconds)
    await decay.start()
    runtime.cleanup.push_async_callback(decay.stop)
    servicer = await _servicer(runtime, store)
    return ServiceRegistration.of(SERVICE_NAME, pb_grpc.add_ThermalMemoryServiceServicer_to_server,
                                  servicer, on_drain=servicer.drain)


def _restore_verifier(runtime: NodeRuntime) -> RestoreVerifier | None:
    """Restore events are signed by an admin identity of this federation's CA."""
    directory = (runtime.credentials.pki_directory if runtime.credentials is not None
                 else PKIPaths(runtime.settings.home).directory)
    verifier = RestoreVerifier.of_home(directory, runtime.settings.trust_domain)
    if verifier is None:
        log.warning("no CA certificates: restore events cannot be verified")
    return verifier


async def _servicer(runtime: NodeRuntime, store: MemoryStore) -> ThermalMemoryServicer:
    """With a guardian configured: the scheduler asking it for checkpoints (stopped on
    ``runtime.cleanup``) and the client listing them for VerifyChain."""
    settings = runtime.settings
    if not settings.peers.addresses("guardian"):
        log.info("no guardian configured (peers.guardian): no audit checkpoints")
        return ThermalMemoryServicer(
            store, max_batch=settings.memory.max_batch,
            stream_max_batches_in_flight=settings.memory.stream_max_batches_in_flight)
    guardian = GuardianCheckpoints(
        runtime.peer_channel("guardian"), settings.grpc.call_timeout_seconds
    )
    config = settings.guardian
    scheduler = CheckpointScheduler(
        store.head_hash, guardian.sign,
        every_records=config.checkpoint_every_records,
        every_seconds=config.checkpoint_every_seconds,
    )
    await scheduler.start()
    runtime.cleanup.push_async_callback(scheduler.stop)
    key_path = settings.home / config.signing_key_file
    return ThermalMemoryServicer(store, guardian=guardian, scheduler=scheduler,
                                 guardian_keys=lambda: guardian_keys(key_path),
                                 max_batch=settings.memory.max_batch,
                                 stream_max_batches_in_flight=(
                                     settings.memory.stream_max_batches_in_flight))
