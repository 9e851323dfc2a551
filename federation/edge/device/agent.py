"""The reference edge device: register, heartbeat, lease, run, report, return.

``federation edge agent`` runs one; the tests and the benchmark run many in one
process. The job kinds it runs are in :mod:`federation.edge.device.jobs`; results
larger than the inline limit are uploaded and returned as a blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from federation.edge.device.client import (
    QUOTA_ERRORS,
    Stub,
    renew_certificate,
    upload_file,
)
from federation.edge.device.jobs import JobFailure, LocalModel, generate_available, perform
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.periodic import cancel_all
from federation.prototime import duration, to_seconds
from federation.v1 import edge_broker_pb2 as pb

log = logging.getLogger(__name__)

HeartbeatCall = grpc.aio.StreamStreamCall[pb.HeartbeatStreamRequest, pb.HeartbeatStreamResponse]
INLINE_RESULT_LIMIT = 64 * 1024


@dataclass(frozen=True)
class AgentOptions:
    max_jobs: int = 3
    """Leases asked for at once; the broker may grant fewer (latency rule)."""
    lease_seconds: float = 30.0
    """Requested lease length; renewed every third of it while a job runs."""
    poll_seconds: float = 0.5
    """Wait between LeaseJobs calls when nothing was pending."""
    simulate_latency_ms: float = 0.0
    """Added to every call, half before and half after: a slow network."""
    rpc_timeout_seconds: float = 30.0
    capabilities: pb.DeviceCapabilities = field(default_factory=pb.DeviceCapabilities)
    battery_percent: int = 100
    charging: bool = True
    renew_certificate_before_seconds: float = 3600.0
    """With a certificate directory: renew when less than this validity remains."""


@dataclass
class _Echo:
    """The broker's latest ``server_time`` and when it arrived: echoed with the time
    held in the next heartbeat, on whichever stream carries it."""

    server_time: Timestamp | None = None
    received: float = 0.0
    measured: bool = False
    """The first answer was echoed at once."""
    fresh: bool = False
    """Answered since the last stream failure (so backoff starts over)."""

    def request(self, *, battery_percent: int, charging: bool, load: float
                ) -> pb.HeartbeatRequest:
        request = pb.HeartbeatRequest(battery_percent=battery_percent, charging=charging,
                                      load=load)
        if self.server_time is not None:
            request.echo_time.CopyFrom(self.server_time)
            request.echo_hold.CopyFrom(duration(time.monotonic() - self.received))
        return request

    def answered(self, reply: pb.HeartbeatResponse) -> None:
        self.server_time, self.received, self.fresh = reply.server_time, time.monotonic(), True


async def _until_none(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """The items put in ``queue`` until ``None``: a stream's requests."""
    while (item := await queue.get()) is not None:
        yield item


class EdgeAgent:
    def __init__(
        self,
        stub: Stub,
        options: AgentOptions | None = None,
        *,
        cert_dir: Path | None = None,
        rebuild_stub: Callable[[], Stub] | None = None,
    ) -> None:
        self._stub = stub
        self._options = options or AgentOptions()
        self._cert_dir = cert_dir
        self._rebuild_stub = rebuild_stub
        self._interval = 5.0
        self._running: dict[str, asyncio.Task[None]] = {}
        self.leases: dict[str, pb.Lease] = {}
        """Current lease of each job being run, by job id."""
        self.completed: list[str] = []
        self._fatal = asyncio.Event()
        self.fatal_error: FederationError | None = None
        self._model = LocalModel()

    # -- lifecycle -----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then return held leases. Cancelling the task
        instead is a crash: leases are left to expire (what a killed app does)."""
        reply = await self._register_unless(stop)
        if reply is None:  # asked to stop before the broker could be reached
            await asyncio.to_thread(self._model.close)
            return
        self._interval = to_seconds(reply.heartbeat_interval) or self._interval
        loops = [asyncio.create_task(self._heartbeats(), name="heartbeat"),
                 asyncio.create_task(self._work(), name="work")]
        if self._cert_dir is not None and self._rebuild_stub is not None:
            loops.append(asyncio.create_task(self._renewals(), name="renewal"))
        for loop in loops:  # a loop that dies must not leave a device that looks alive
            loop.add_done_callback(self._loop_ended)
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._fatal.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            held = dict(self.leases)  # job tasks forget their lease as they are cancelled
            await cancel_all([*loops, *waiters, *self._running.values()])
            await asyncio.to_thread(self._model.close)
        await self._return_leases(held)
        if self.fatal_error is not None:
            raise self.fatal_error

    async def _register_unless(self, stop: asyncio.Event) -> pb.RegisterDeviceResponse | None:
        """:meth:`_register`, given up (``None``) if ``stop`` is set first: a device asked
        to stop while its broker is unreachable stops, instead of retrying for ever."""
        registering = asyncio.create_task(self._register(), name="register")
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([registering, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all([stopped] if registering.done() else [registering, stopped])
        if registering.cancelled() or (stop.is_set() and registering.exception()):
            return None  # stopped under it; an error it ended with is the stop's doing
        return registering.result()  # or its error: a refusal that is not an outage

    async def _register(self) -> pb.RegisterDeviceResponse:
        """Register, waiting out a broker that is not reachable yet (with backoff)."""
        request = pb.RegisterDeviceRequest(capabilities=self._capabilities())
        delay = 0.2
        while True:
            try:
                reply: pb.RegisterDeviceResponse = await self._rpc(
                    self._stub.RegisterDevice, request
                )
                return reply
            except FederationError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE:
                    raise
                log.warning("broker unavailable (%s); retrying in %.1fs", exc.message, delay,
                            extra={"detail": _rpc_detail(exc)})
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)

    def _capabilities(self) -> pb.DeviceCapabilities:
        caps = pb.DeviceCapabilities()
        caps.CopyFrom(self._options.capabilities)
        if not caps.cpu_cores:
            caps.cpu_cores = os.cpu_count() or 1
        caps.battery_percent = self._options.battery_percent
        caps.charging = self._options.charging
        if generate_available() and "smollm2-135m-instruct" not in caps.local_models:
            caps.local_models.append("smollm2-135m-instruct")
        return caps

    async def _return_leases(self, held: dict[str, pb.Lease]) -> None:
        """Graceful shutdown: hand every held job back for another device."""
        for job_id, lease in held.items():
            with contextlib.suppress(FederationError):
                await self._rpc(
                    self._stub.FailJob,
                    pb.FailJobRequest(
                        job_id=job_id, fencing_token=lease.fencing_token,
                        error="returned: the agent shut down", retryable=True,
                    ),
                )

    def _loop_ended(self, loop: asyncio.Task[None]) -> None:
        if loop.cancelled() or self._fatal.is_set():
            return
        error = loop.exception()
        reason = f"{type(error).__name__}: {error}" if error else "it returned"
        self._die(FederationError(ErrorCode.INTERNAL,
                                  f"the agent's {loop.get_name()} loop ended ({reason})"))

    def _die(self, error: FederationError) -> None:
        log.error("agent stopping: %s", error.message)
        self.fatal_error = error
        self._fatal.set()

    async def _rpc(self, method: Any, request: Any) -> Any:
        await self._network_leg()
        with self._call_errors("the call was cancelled"):
            reply = await method(request, timeout=self._options.rpc_timeout_seconds)
        await self._network_leg()
        return reply

    async def _network_leg(self) -> None:
        """One way of the simulated round trip (``--simulate-latency-ms``)."""
        if self._options.simulate_latency_ms:
            await asyncio.sleep(self._options.simulate_latency_ms / 2000)

    @contextlib.contextmanager
    def _call_errors(self, cancelled: str) -> Iterator[None]:
        """A call's failure as a FederationError; UNAUTHENTICATED stops the agent."""
        try:
            yield
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if error.code is ErrorCode.UNAUTHENTICATED:
                self._die(error)  # revoked: nothing this device sends will be accepted
            raise error from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this task is being cancelled: stop (or a crash)
            # Only the call was cancelled, e.g. its channel closed after a certificate
            # renewal: a failed call, not a reason for the loop making it to end.
            raise FederationError(ErrorCode.CANCELLED, cancelled) from None

    # -- heartbeats ----------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Heartbeat over one HeartbeatStream, reopened with backoff and jitter when
        it fails, and at once on the new stub after a certificate renewal."""
        echo = _Echo()
        failures = 0
        while True:
            stub = self._stub
            try:
                await self._heartbeat_stream(stub, echo)
            except FederationError as exc:
                if self._stub is not stub:
                    # Its channel was closed after a certificate renewal, perhaps under
                    # a read: not the broker failing, so no backoff before the new one.
                    log.info("heartbeat stream moved to the renewed certificate's channel")
                    continue
                failures = 1 if echo.fresh else failures + 1
                echo.fresh = False
                backoff = min(30.0, 0.5 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning("heartbeat stream failed (%s); reopening in %.1fs",
                            exc.message, backoff, extra={"detail": _rpc_detail(exc)})
                await asyncio.sleep(backoff)

    async def _heartbeat_stream(self, stub: Stub, echo: _Echo) -> None:
        """Heartbeat on one stream until it fails (raises) or ``self._stub`` is
        replaced (returns: a live channel keeps its old certificate)."""
        # Requests go through our own queue rather than call.write(): ending the
        # iterator below releases grpc's task that sends them even when the call
        # has already failed (cancel() does not then), and write() on an
        # intercepted call costs extra tasks per message.
        outbox: asyncio.Queue[pb.HeartbeatStreamRequest | None] = asyncio.Queue()
        call = stub.HeartbeatStream(_until_none(outbox))
        try:
            while self._stub is stub:
                reply = await self._stream_beat(call, outbox, echo)
                self._interval = to_seconds(reply.heartbeat_interval) or self._interval
                if not echo.measured:  # echo at once, so latency is known seconds after start
                    echo.measured = True
                    continue
                # Jitter below the interval: spreads devices without risking a miss.
                await asyncio.sleep(self._interval * random.uniform(0.8, 1.0))
        finally:
            outbox.put_nowait(None)
            call.cancel()

    async def _stream_beat(
        self, call: HeartbeatCall, outbox: asyncio.Queue[pb.HeartbeatStreamRequest | None],
        echo: _Echo,
    ) -> pb.HeartbeatResponse:
        request = pb.HeartbeatStreamRequest(heartbeat=echo.request(
            battery_percent=self._options.battery_percent,
            charging=self._options.charging,
            load=_load(),
        ))
        await self._network_leg()
        outbox.put_nowait(request)
        try:
            # A cancelled read means its channel was closed under it (the old one,
            # after a certificate renewal): the stream is reopened, not abandoned.
            with self._call_errors("the heartbeat channel was closed"):
                async with asyncio.timeout(self._options.rpc_timeout_seconds):
                    message = await call.read()  # a finished call raises its status here
        except TimeoutError:
            raise FederationError(
                ErrorCode.DEADLINE_EXCEEDED, "no heartbeat answer in time"
            ) from None
        if not isinstance(message, pb.HeartbeatStreamResponse):  # EOF
            raise FederationError(ErrorCode.UNAVAILABLE, "the broker ended the heartbeat stream")
        await self._network_leg()
        reply: pb.HeartbeatResponse = message.heartbeat
        echo.answered(reply)
        return reply

    # -- work ------------------------------------------------------------------

    async def _work(self) -> None:
        options = self._options
        wake = asyncio.Event()
        while True:
            room = options.max_jobs - len(self._running)
            granted = 0
            if room > 0:
                granted = await self._lease(room, wake)
            if granted:
                continue
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), options.poll_seconds)

    async def _lease(self, room: int, wake: asyncio.Event) -> int:
        request = pb.LeaseJobsRequest(
            max_jobs=room, lease_duration=duration(self._options.lease_seconds)
        )
        try:
            reply: pb.LeaseJobsResponse = await self._rpc(self._stub.LeaseJobs, request)
        except FederationError as exc:
            log.warning("lease failed: %s", exc.message)
            return 0
        for lease in reply.leases:
            job_id = lease.job.job_id
            self.leases[job_id] = lease
            task = asyncio.create_task(self._execute(job_id))
            self._running[job_id] = task
            task.add_done_callback(functools.partial(self._finished, job_id, wake))
        return len(reply.leases)

    def _finished(self, job_id: str, wake: asyncio.Event, _: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        wake.set()

    async def _execute(self, job_id: str) -> None:
        renewing = asyncio.create_task(self._keep_renewed(job_id))
        try:
            job = self.leases[job_id].job
            try:
                result = await perform(self._stub, job, self._model)
            except JobFailure as failure:
                await self._report_failure(job_id, str(failure), failure.retryable)
            else:
                await self._report_result(job_id, result)
        except FederationError as exc:
            log.warning("job %s: %s", job_id, exc.message)  # e.g. the lease lapsed
        finally:
            renewing.cancel()
            self.leases.pop(job_id, None)

    async def _report_result(self, job_id: str, result: bytes) -> None:
        request = pb.CompleteJobRequest(
            job_id=job_id, fencing_token=self.leases[job_id].fencing_token
        )
        if len(result) <= INLINE_RESULT_LIMIT:
            request.inline_result = result
        else:
            try:
                request.result_blob_digest = await _upload_bytes(self._stub, result)
            except FederationError as exc:
                if exc.code not in QUOTA_ERRORS:
                    raise
                # Not a failure to wait out with the lease held: this device cannot store
                # the result now, another device may. The attempt counts.
                await self._report_failure(
                    job_id, f"result upload refused: {exc.message}", retryable=True)
                return
        await self._rpc(self._stub.CompleteJob, request)
        self.completed.append(job_id)

    async def _report_failure(self, job_id: str, error: str, retryable: bool) -> None:
        await self._rpc(
            self._stub.FailJob,
            pb.FailJobRequest(
                job_id=job_id, fencing_token=self.leases[job_id].fencing_token,
                error=error, retryable=retryable,
            ),
        )

    async def _keep_renewed(self, job_id: str) -> None:
        period = self._options.lease_seconds / 3
        while True:
            await asyncio.sleep(period)
            lease = self.leases[job_id]
            reply: pb.RenewLeaseResponse = await self._rpc(
                self._stub.RenewLease,
                pb.RenewLeaseRequest(
                    job_id=job_id, fencing_token=lease.fencing_token,
                    extension=duration(self._options.lease_seconds),
                ),
            )
            self.leases[job_id] = reply.lease

    async def _renewals(self) -> None:
        assert self._cert_dir is not None and self._rebuild_stub is not None
        before = self._options.renew_certificate_before_seconds
        failures = 0
        while True:
            if _certificate_remaining(self._cert_dir) < before:
                try:
                    await renew_certificate(
                        self._stub, self._cert_dir, self._options.rpc_timeout_seconds
                    )
                except (FederationError, grpc.aio.AioRpcError) as exc:
                    failures += 1
                    log.warning("certificate renewal failed: %s", exc)
                else:
                    failures = 0
                    self._stub = self._rebuild_stub()  # a live channel keeps its old cert
                    log.info("renewed the device certificate")
            # Look again when renewal falls due (at most a minute away), not on a
            # fixed period that can step over a renewal window shorter than it.
            due = _certificate_remaining(self._cert_dir) - before
            await asyncio.sleep(min(60.0, 2.0**failures if failures else max(1.0, due)))


async def _upload_bytes(stub: Stub, data: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result"
        path.write_bytes(data)
        return await upload_file(stub, path)


def _rpc_detail(exc: FederationError) -> str:
    """What gRPC said of a failed call (``failed to connect to all addresses; …``): the
    operator's clue to a transport failure that the agent's message words generally."""
    cause = exc.__cause__
    return (cause.details() or "")[:300] if isinstance(cause, grpc.aio.AioRpcError) else ""


def _load() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def _certificate_remaining(cert_dir: Path) -> float:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((cert_dir / "cert.pem").read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()

