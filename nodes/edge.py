"""EdgeBrokerService: a thin adapter from protobuf to :mod:`federation.edge`.

Identity is bound to the request: a device acts only as the identity of its
client certificate (``spiffe://…/edge/<device_id>``); no request field names
a device. Every call from an edge identity first checks that the device is not
revoked (cached briefly, ``edge.revocation_cache_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from federation.config import ConfigError
from federation.edge import convert
from federation.edge.broker import EdgeBroker, check_limits
from federation.edge.convert import STATE_FROM_PB
from federation.edge.model import JobState, parse_blob_digest
from federation.errors import ErrorCode, FederationError
from federation.interceptor import certificate_not_after, current_caller, ensure_unexpired
from federation.memory.client import GrpcAuditSink
from federation.memory.sink import AuditSink
from federation.pki import EdgeSigner, PKIError, load_edge_signer
from federation.prototime import checked_datetime, duration, timestamp, to_seconds
from federation.server import ServiceRegistration, until_drained
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from nodes.runtime import NodeRuntime

log = logging.getLogger(__name__)

SERVICE_NAME = "federation.v1.EdgeBrokerService"
if TYPE_CHECKING:  # the stubs are generic, the runtime class is not
    Context = grpc.aio.ServicerContext[Any, Any]

_MAX_ECHO_AGE = dt.timedelta(minutes=10)
"""Echoed timestamps older than this are ignored rather than taken as latency."""


def _ensure_unexpired(not_after: dt.datetime | None) -> None:
    try:
        ensure_unexpired(not_after)
    except PKIError as exc:
        raise FederationError(ErrorCode.UNAUTHENTICATED, str(exc)) from None


def _shutting_down() -> FederationError:
    return FederationError(ErrorCode.UNAVAILABLE,
                           "the broker is shutting down; reconnect", retry_after_seconds=1.0)


class EdgeBrokerServicer(edge_broker_pb2_grpc.EdgeBrokerServiceServicer):
    def __init__(self, broker: EdgeBroker) -> None:
        self._broker = broker
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """End the long-lived streams (heartbeats, job watches): the node is stopping."""
        self._draining.set()

    # -- identity ------------------------------------------------------------

    async def _device(self) -> str:
        """The calling device's id; only edge identities are devices."""
        device_id = self._edge_caller()
        await self._broker.revocations.ensure_not_revoked(device_id)
        return device_id

    @staticmethod
    def _edge_caller() -> str:
        caller = current_caller()
        if caller.role != "edge":
            raise FederationError(
                ErrorCode.PERMISSION_DENIED, f"{caller.spiffe_id} is not an edge device"
            )
        return caller.name

    async def _uploader(self) -> str:
        """Uploads are owned by the caller's identity (devices and operators)."""
        caller = current_caller()
        if caller.role == "edge":
            await self._broker.revocations.ensure_not_revoked(caller.name)
        return caller.spiffe_id

    def _enrollment(self) -> Any:
        if self._broker.enrollment is None:
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                "this broker holds no edge CA key and cannot issue certificates",
            )
        return self._broker.enrollment

    # -- enrollment ----------------------------------------------------------

    async def Enroll(self, request: pb.EnrollRequest, context: Context) -> pb.EnrollResponse:
        issued = await self._enrollment().enroll(
            request.token, request.csr_der, request.device_name
        )
        return pb.EnrollResponse(
            certificate_der=issued.certificate_der,
            ca_certificate_der=issued.ca_certificate_der,
            chain_der=issued.chain_der,
            not_after=timestamp(issued.not_after),
            device_id=issued.device_id,
        )

    async def RenewCertificate(
        self, request: pb.RenewCertificateRequest, context: Context
    ) -> pb.RenewCertificateResponse:
        device_id = await self._device()
        issued = await self._enrollment().renew(device_id, request.csr_der)
        return pb.RenewCertificateResponse(
            certificate_der=issued.certificate_der, not_after=timestamp(issued.not_after),
            chain_der=issued.chain_der,
        )

    # -- devices -------------------------------------------------------------

    async def RegisterDevice(
        self, request: pb.RegisterDeviceRequest, context: Context
    ) -> pb.RegisterDeviceResponse:
        device_id = await self._device()
        device = await self._broker.devices.register(
            device_id, convert.capabilities_from_pb(request.capabilities),
            actor=current_caller().spiffe_id,
        )
        return pb.RegisterDeviceResponse(
            device=convert.device_to_pb(device),
            heartbeat_interval=duration(self._broker.config.heartbeat_interval_seconds),
        )

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        return await self._beat(self._edge_caller(), request)

    async def HeartbeatStream(
        self, request_iterator: AsyncIterator[pb.HeartbeatStreamRequest], context: Context
    ) -> AsyncIterator[pb.HeartbeatStreamResponse]:
        # The interceptor authenticated and authorized the caller once, for the
        # stream; each heartbeat still goes through the registry's conditional
        # UPDATE, so a device revoked mid-stream is refused at its next one and
        # the stream ends with UNAUTHENTICATED.
        device_id = self._edge_caller()
        not_after = certificate_not_after(context)
        async for message in until_drained(request_iterator, self._draining, _shutting_down):
            _ensure_unexpired(not_after)  # the stream may outlive the certificate
            reply = await self._beat(device_id, message.heartbeat)
            yield pb.HeartbeatStreamResponse(heartbeat=reply)

    async def _beat(self, device_id: str, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        # No cached revocation lookup first: the heartbeat's own conditional
        # UPDATE refuses a revoked device, fresher than the cache could.
        revocations = self._broker.revocations
        revocations.ensure_not_known_revoked(device_id)
        now = dt.datetime.now(dt.UTC)
        try:
            device = await self._broker.devices.heartbeat(
                device_id,
                battery_percent=request.battery_percent,
                charging=request.charging,
                load=request.load,
                round_trip_ms=_round_trip_ms(request, now),
                actor=current_caller().spiffe_id,
            )
        except FederationError as exc:
            if exc.code is ErrorCode.UNAUTHENTICATED:
                revocations.note_revoked(device_id)
            raise
        revocations.note_live(device_id)
        reply = pb.HeartbeatResponse(
            server_time=timestamp(dt.datetime.now(dt.UTC)),
            heartbeat_interval=duration(self._broker.config.heartbeat_interval_seconds),
        )
        if device.smoothed_latency_ms is not None:
            reply.smoothed_latency.CopyFrom(duration(device.smoothed_latency_ms / 1000))
        return reply

    # -- jobs: tenants ---------------------------------------------------------

    async def SubmitJob(
        self, request: pb.SubmitJobRequest, context: Context
    ) -> pb.SubmitJobResponse:
        spec = convert.spec_from_pb(request)
        if spec.payload_blob is not None:
            self._require_blob(spec.payload_blob, "payload_blob_digest")
        job = await self._broker.queue.submit(spec, actor=current_caller().spiffe_id)
        return pb.SubmitJobResponse(job=convert.job_to_pb(job))

    def _require_blob(self, digest: str, param: str) -> None:
        """A job may only name a blob the broker holds: a digest nobody uploaded would
        leave the job pointing at nothing."""
        if not self._broker.uploads.blobs.exists(digest):
            raise FederationError(
                ErrorCode.FAILED_PRECONDITION, f"blob {digest} has not been uploaded",
                param=param,
            )

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        job = await self._broker.queue.get(request.job_id)
        return pb.GetJobResponse(job=convert.job_to_pb(job))

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: Context
    ) -> pb.ListJobsResponse:
        state = _state_filter(request.state)
        jobs, token = await self._broker.queue.list_jobs(
            request.tenant_id, state, request.page_size, request.page_token
        )
        return pb.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in jobs], next_page_token=token
        )

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        job = await self._broker.queue.cancel(
            request.job_id, request.reason, actor=current_caller().spiffe_id
        )
        return pb.CancelJobResponse(job=convert.job_to_pb(job))

    async def WatchJob(  # type: ignore[override]
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        queue, poll = self._broker.queue, self._broker.config.watch_poll_seconds
        job = await queue.get(request.job_id)
        yield pb.WatchJobResponse(job=convert.job_to_pb(job))
        while not job.state.terminal:
            with contextlib.suppress(TimeoutError):  # the usual case: poll again
                await asyncio.wait_for(self._draining.wait(), poll)
                raise _shutting_down()  # not a timeout: the broker is draining
            latest = await queue.get(request.job_id)
            if (latest.updated_at, latest.state) != (job.updated_at, job.state):
                job = latest
                yield pb.WatchJobResponse(job=convert.job_to_pb(job))

    # -- jobs: devices ---------------------------------------------------------

    async def LeaseJobs(
        self, request: pb.LeaseJobsRequest, context: Context
    ) -> pb.LeaseJobsResponse:
        device_id = await self._device()
        wanted = _requested_seconds(request, "lease_duration")
        leases = await self._broker.queue.lease(device_id, request.max_jobs or 1, wanted)
        return pb.LeaseJobsResponse(leases=[convert.lease_to_pb(lease) for lease in leases])

    async def RenewLease(
        self, request: pb.RenewLeaseRequest, context: Context
    ) -> pb.RenewLeaseResponse:
        device_id = await self._device()
        extension = _requested_seconds(request, "extension")
        lease = await self._broker.queue.renew(
            device_id, request.job_id, request.fencing_token, extension
        )
        return pb.RenewLeaseResponse(lease=convert.lease_to_pb(lease))

    async def CompleteJob(
        self, request: pb.CompleteJobRequest, context: Context
    ) -> pb.CompleteJobResponse:
        device_id = await self._device()
        which = request.WhichOneof("result")
        if which == "result_blob_digest":
            self._require_blob(request.result_blob_digest, "result_blob_digest")
        job = await self._broker.queue.complete(
            device_id,
            request.job_id,
            request.fencing_token,
            inline_result=request.inline_result if which == "inline_result" else None,
            result_blob=request.result_blob_digest if which == "result_blob_digest" else None,
        )
        return pb.CompleteJobResponse(job=convert.job_to_pb(job))

    async def FailJob(self, request: pb.FailJobRequest, context: Context) -> pb.FailJobResponse:
        device_id = await self._device()
        job = await self._broker.queue.fail(
            device_id, request.job_id, request.fencing_token, request.error, request.retryable
        )
        return pb.FailJobResponse(job=convert.job_to_pb(job))

    # -- blobs -----------------------------------------------------------------

    async def Upload(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: Context
    ) -> pb.UploadResponse:
        owner = await self._uploader()
        not_after = certificate_not_after(context)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "start":
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT, "the first Upload message must be `start`"
            )
        start = first.start
        session = await self._broker.uploads.open(
            owner, start.upload_id, start.total_size, start.sha256
        )
        async with session:
            async for message in request_iterator:
                # A long upload outlives checks made once per call: a device revoked
                # (or whose certificate lapsed) mid-stream is refused at its next message.
                _ensure_unexpired(not_after)
                await self._uploader()
                part = message.WhichOneof("part")
                if part == "chunk":
                    chunk = message.chunk
                    await session.write(chunk.offset, chunk.data, chunk.crc32c)
                elif part == "finish" and message.finish:
                    await session.finish()
                    break
                else:
                    raise FederationError(
                        ErrorCode.INVALID_ARGUMENT, "after `start`, send chunks then `finish`"
                    )
        return pb.UploadResponse(
            committed_size=session.committed,
            complete=session.complete,
            blob_digest=session.blob_digest,
        )

    async def QueryUploadStatus(
        self, request: pb.QueryUploadStatusRequest, context: Context
    ) -> pb.QueryUploadStatusResponse:
        status = await self._broker.uploads.status(await self._uploader(), request.upload_id)
        return pb.QueryUploadStatusResponse(
            committed_size=status.committed_size,
            total_size=status.total_size,
            complete=status.complete,
            blob_digest=status.blob_digest,
        )

    async def Download(  # type: ignore[override]
        self, request: pb.DownloadRequest, context: Context
    ) -> AsyncIterator[pb.DownloadResponse]:
        owner = await self._uploader()
        digest = request.blob_digest
        parse_blob_digest(digest)
        caller = current_caller()
        if caller.role == "edge" and not await self._broker.uploads.device_may_read(
                owner, caller.name, digest):
            # The same answer as for a blob that does not exist: a device learns nothing
            # of blobs it may not read.
            raise FederationError(ErrorCode.NOT_FOUND, f"no blob {digest}", param="blob_digest")
        await self._broker.uploads.check_blob_present(digest)
        config = self._broker.config
        size = min(request.chunk_size or config.chunk_max_bytes, config.chunk_max_bytes)
        offset = request.offset
        async for data in self._broker.uploads.blobs.read(digest, offset, size):
            yield pb.DownloadResponse(offset=offset, data=data)
            offset += len(data)


def _requested_seconds(request: Any, field: str) -> float | None:
    """A requested lease length: unset (or zero) is the server default, which the broker
    may shorten; a negative one is a malformed request, not a default."""
    if not request.HasField(field):
        return None
    seconds = to_seconds(getattr(request, field))
    if seconds < 0:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{field} must not be negative; got {seconds:g}s", param=field)
    return seconds


def _state_filter(number: int) -> JobState | None:
    """The ListJobs filter: UNSPECIFIED is any state; a number no state has is refused
    rather than read as "any" (the caller asked for something it would not get)."""
    if number == pb.JOB_STATE_UNSPECIFIED:
        return None
    state = STATE_FROM_PB.get(number)
    if state is None:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"unknown job state {number}",
                              param="state")
    return state


def _round_trip_ms(request: pb.HeartbeatRequest, now: dt.datetime) -> float | None:
    """Broker time now minus the broker time it handed out, minus the device's wait."""
    if not request.HasField("echo_time"):
        return None
    echoed = checked_datetime(request.echo_time, "echo_time")
    held = dt.timedelta(seconds=to_seconds(request.echo_hold))
    if not dt.timedelta(0) <= now - echoed <= _MAX_ECHO_AGE:
        return None
    return max((now - echoed - held).total_seconds() * 1000, 0.0)


def registration(broker: EdgeBroker) -> ServiceRegistration:
    servicer = EdgeBrokerServicer(broker)
    return ServiceRegistration.of(
        SERVICE_NAME, edge_broker_pb2_grpc.add_EdgeBrokerServiceServicer_to_server, servicer,
        on_drain=servicer.drain)


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    settings = runtime.settings
    check_limits(settings.edge, settings.grpc)
    broker = EdgeBroker.create(
        runtime.require_database().pool,
        settings.edge,
        settings.home,
        _edge_signer(runtime),
        _audit_sink(runtime),
    )
    await runtime.cleanup.enter_async_context(broker.background())
    return registration(broker)


def _edge_signer(runtime: NodeRuntime) -> EdgeSigner | None:
    try:
        return load_edge_signer(runtime.settings.home, runtime.settings.trust_domain)
    except PKIError as exc:
        log.warning("device enrollment is unavailable: %s", exc)
        return None


def _audit_sink(runtime: NodeRuntime) -> AuditSink | None:
    try:
        channel = runtime.peer_channel("memory")
    except ConfigError:
        log.warning("no memory peer configured: job events stay in the audit outbox")
        return None
    return GrpcAuditSink(channel, timeout_seconds=runtime.settings.grpc.call_timeout_seconds)

