"""HeartbeatStream: one long-lived stream per device, each heartbeat still a
conditional write; the reference agent reopens it after failures and renewals."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from federation.channels import secure_channel
from federation.config import EdgeConfig, GrpcConfig
from federation.db import Database
from federation.edge.broker import EdgeBroker
from federation.edge.device.agent import AgentOptions, EdgeAgent
from federation.edge.device.client import Stub, device_channel, enroll
from federation.edge.enrollment import create_token
from federation.edge.model import Device
from federation.errors import ErrorCode, FederationError
from federation.prototime import duration
from federation.server import NodeServer
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from nodes.edge import SERVICE_NAME, registration
from tests.edge_support import (
    FAST_EDGE,
    BrokerNode,
    admin_stub,
    broker_server,
    device_stub,
    far_agent,
    register,
    wait_for,
)
from tests.support import TestPKI

CONFIG = dataclasses.replace(FAST_EDGE, heartbeat_interval_seconds=0.2)
"""Offline after 0.4 s of silence; the reaper looks every 0.05 s."""

AGENT = AgentOptions(poll_seconds=0.05, lease_seconds=5.0)


@pytest.fixture
def broker_config() -> EdgeConfig:
    return CONFIG

class Stream:
    """One device's HeartbeatStream, its requests fed from a queue (as the agent
    does: ending the queue releases grpc's sending task even after a failure)."""

    def __init__(self, stub: Stub) -> None:
        self._outbox: asyncio.Queue[pb.HeartbeatStreamRequest | None] = asyncio.Queue()
        self.call = stub.HeartbeatStream(self._requests())

    async def _requests(self) -> AsyncIterator[pb.HeartbeatStreamRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def beat(self, request: pb.HeartbeatRequest | None = None) -> pb.HeartbeatResponse:
        self._outbox.put_nowait(pb.HeartbeatStreamRequest(heartbeat=request))
        reply = await self.call.read()
        assert isinstance(reply, pb.HeartbeatStreamResponse), reply
        return reply.heartbeat

    def close(self) -> None:
        self._outbox.put_nowait(None)
        self.call.cancel()


async def streaming_device(pki: TestPKI, server: NodeServer, name: str) -> tuple[Stub, Stream]:
    """A registered device's stub and its heartbeat stream, open."""
    stub = device_stub(pki, server.port, name)
    await register(stub)
    return stub, Stream(stub)


def echo_of(reply: pb.HeartbeatResponse, held_seconds: float) -> pb.HeartbeatRequest:
    return pb.HeartbeatRequest(
        battery_percent=70, echo_time=reply.server_time, echo_hold=duration(held_seconds)
    )


def stream_counts(server: NodeServer) -> tuple[float, float]:
    """(HeartbeatStream calls finished, in flight) from the server's own metrics."""
    labels = {"grpc_service": SERVICE_NAME, "grpc_method": "HeartbeatStream"}
    in_flight = server.registry.get_sample_value("federation_grpc_server_in_flight", labels)
    finished = sum(
        sample.value
        for metric in server.registry.collect()
        if metric.name == "federation_grpc_server_handled"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["grpc_method"] == "HeartbeatStream"
    )
    return finished, in_flight or 0.0


async def last_heartbeat(database: Database, device_id: str) -> dt.datetime:
    value: dt.datetime = await database.pool.fetchval(
        "SELECT last_heartbeat_at FROM edge_devices WHERE device_id = $1", device_id
    )
    return value


async def assert_heartbeating(database: Database, device_id: str) -> None:
    """The device's heartbeats keep arriving: its last one moves on within two intervals."""
    seen = await last_heartbeat(database, device_id)
    await asyncio.sleep(0.5)  # over two 0.2 s intervals
    assert await last_heartbeat(database, device_id) > seen


# -- the RPC ---------------------------------------------------------------------------


async def test_latency_is_measured_from_echoes_over_the_stream(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, broker = broker_node
    _, stream = await streaming_device(pki, server, "streamer")
    first = await stream.beat()
    received = time.monotonic()
    assert not first.HasField("smoothed_latency")  # nothing echoed yet
    await asyncio.sleep(0.3)
    # The >= 0.3 s the device held the echo are not latency: the sample is small.
    second = await stream.beat(echo_of(first, time.monotonic() - received))
    smoothed = (await broker.devices.get("streamer")).smoothed_latency_ms
    assert smoothed is not None and smoothed < 200
    assert second.smoothed_latency.ToMilliseconds() == pytest.approx(smoothed, abs=1)
    await asyncio.sleep(0.25)
    # Held 0.25 s but claiming none: all of it counts (EWMA 0.2 of >= 250 ms).
    third = await stream.beat(echo_of(second, 0.0))
    assert third.smoothed_latency.ToMilliseconds() >= 0.2 * 250 + 0.8 * smoothed - 1
    assert (await broker.devices.get("streamer")).battery_percent == 70
    stream.close()


async def test_revoked_device_stream_ends_unauthenticated_without_reviving(
    pki: TestPKI, broker_node: BrokerNode, database: Database
) -> None:
    server, broker = broker_node
    stub, stream = await streaming_device(pki, server, "stolen")
    await stream.beat()
    await broker.devices.revoke("stolen", actor="ops")
    revoked_at = await last_heartbeat(database, "stolen")
    # The same open stream: authenticated at its start, refused now by the
    # conditional UPDATE (not by a cache: this broker never saw it revoked).
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.beat()
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (await broker.devices.get("stolen")).state.value == "revoked"
    assert await last_heartbeat(database, "stolen") == revoked_at
    stream.close()
    reopened = Stream(stub)  # and a new stream too
    with pytest.raises(grpc.aio.AioRpcError) as refused_again:
        await reopened.beat()
    assert refused_again.value.code() is grpc.StatusCode.UNAUTHENTICATED
    reopened.close()


async def test_a_stream_outliving_the_device_certificate_is_refused(
    home: Path, database: Database
) -> None:
    """Authenticated once, at the stream's start: the stream must still end when the
    certificate it was opened with expires (the device should have renewed)."""
    pki = TestPKI(home)
    files = pki.ca.issue("edge", "lapsed", validity=dt.timedelta(seconds=2))
    expires = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        channel = secure_channel(f"localhost:{server.port}", files, GrpcConfig())
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        await register(stub)
        stream = Stream(stub)
        await stream.beat()
        await asyncio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.beat()
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "certificate expired" in (refused.value.details() or "")
        stream.close()
        await channel.close()


async def test_unregistered_device_stream_ends_failed_precondition(
    pki: TestPKI, broker_node: BrokerNode, database: Database
) -> None:
    server, _ = broker_node
    stranger = device_stub(pki, server.port, "stranger")
    stream = Stream(stranger)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stream.beat()
    stream.close()
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert await database.pool.fetchval("SELECT count(*) FROM edge_devices") == 0


async def test_operator_identity_may_not_open_a_heartbeat_stream(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    """Only edge identities are devices; a gateway is denied by the authz table."""
    server, _ = broker_node
    gateway = device_stub(pki, server.port, "gw", role="gateway")
    stream = Stream(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stream.beat()
    stream.close()
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_silent_stream_goes_offline_and_its_leases_are_released(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    """An open stream is not a heartbeat: only heartbeats on it keep a device online."""
    server, broker = broker_node
    admin = admin_stub(pki, server.port)
    job = await admin.SubmitJob(pb.SubmitJobRequest(
        tenant_id="acme", kind="echo", type=pb.JOB_TYPE_BATCH, inline_payload=b"x"
    ))
    stub = device_stub(pki, server.port, "sleepy")
    await register(stub)
    leased = await stub.LeaseJobs(pb.LeaseJobsRequest(max_jobs=1,
                                                      lease_duration=duration(60)))
    assert [lease.job.job_id for lease in leased.leases] == [job.job.job_id]
    stream = Stream(stub)
    for _ in range(16):  # 0.8 s of heartbeats, twice the offline threshold
        await stream.beat()
        await asyncio.sleep(0.05)
    assert (await broker.devices.get("sleepy")).state.value == "online"
    assert (await broker.queue.get(job.job.job_id)).state.value == "leased"

    async def released() -> bool:
        return (await broker.queue.get(job.job.job_id)).state.value == "pending"

    await wait_for(released, 5)  # the stream is still open, but silent
    assert (await broker.devices.get("sleepy")).state.value == "offline"
    assert (await broker.queue.get(job.job.job_id)).last_error == "device went offline"
    await stream.beat()  # a heartbeat on the same stream brings it back online
    assert (await broker.devices.get("sleepy")).state.value == "online"
    stream.close()


# -- the reference agent -----------------------------------------------------------------


async def test_agent_heartbeats_over_one_stream(home: Path, database: Database) -> None:
    pki = TestPKI(home)
    async with broker_server(pki, database, home, CONFIG) as (server, broker, _), \
            far_agent(pki, server, broker, AGENT):
        await assert_heartbeating(database, "far")
        assert stream_counts(server) == (0, 1)  # one stream, never reopened


async def test_revoked_agent_stops_on_its_next_streamed_heartbeat(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, broker = broker_node
    agent = EdgeAgent(device_stub(pki, server.port, "lost"), AGENT)
    running = asyncio.create_task(agent.run(asyncio.Event()))

    async def heartbeating() -> bool:
        with contextlib.suppress(FederationError):
            return (await broker.devices.get("lost")).last_heartbeat_at is not None
        return False

    await wait_for(heartbeating)
    await broker.devices.revoke("lost", actor="ops")
    with pytest.raises(FederationError) as stopped:
        async with asyncio.timeout(10):
            await running
    assert stopped.value.code is ErrorCode.UNAUTHENTICATED
    assert (await broker.devices.get("lost")).state.value == "revoked"


@contextlib.asynccontextmanager
async def broker_at(
    pki: TestPKI, database: Database, home: Path, port: int, config: EdgeConfig = CONFIG
) -> AsyncIterator[BrokerNode]:
    """A broker on a fixed port, so a "restarted" one is reachable at the same address."""
    broker = EdgeBroker.create(database.pool, config, home, pki.ca.edge_signer(), None)
    server = NodeServer(
        [registration(broker)], trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(grace_seconds=0), listen=f"127.0.0.1:{port}",
        credentials=pki.identity("broker", "server"), metrics_port=None,
    )
    await server.start()
    try:
        async with broker.background():
            yield server, broker
    finally:
        await server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_agent_keeps_heartbeating_across_a_broker_restart(
    home: Path, database: Database
) -> None:
    pki = TestPKI(home)
    port = free_port()
    stop = asyncio.Event()
    agent = EdgeAgent(device_stub(pki, port, "steady"), AGENT)
    async with broker_at(pki, database, home, port) as (first, broker):
        running = asyncio.create_task(agent.run(stop))

        async def heartbeating() -> bool:
            with contextlib.suppress(FederationError):
                return (await broker.devices.get("steady")).last_heartbeat_at is not None
            return False

        async def streaming() -> bool:
            return stream_counts(first)[1] == 1

        # Registration alone sets last_heartbeat_at: wait for the stream itself too.
        await wait_for(heartbeating)
        await wait_for(streaming)
    async with broker_at(pki, database, home, port) as (second, _):

        async def reopened() -> bool:
            return stream_counts(second)[1] == 1

        await wait_for(reopened)
        await assert_heartbeating(database, "steady")
        assert agent.fatal_error is None and not running.done()
        stop.set()
        await running


async def test_agent_reopens_its_stream_on_the_renewed_certificate(
    pki: TestPKI, broker_node: BrokerNode, database: Database, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The renewal lands while a heartbeat's answer is on its way, and the old
    channel is closed under it: the agent moves its stream to the new channel at once,
    not after the backoff of a failed stream."""
    server, broker = broker_node
    token = await create_token(database.pool, "renewing", dt.timedelta(minutes=1), actor="ops")
    cert_dir = tmp_path / "renewing"
    await enroll(f"localhost:{server.enrollment_port}",
                 pki.ca.paths.ca_cert.read_bytes(), token, "", cert_dir)
    target = f"localhost:{server.port}"
    channels = [device_channel(target, cert_dir, GrpcConfig())]
    closing: list[asyncio.Task[None]] = []
    late, answering = asyncio.Event(), asyncio.Event()
    heartbeat = broker.devices.heartbeat

    async def late_heartbeat(device_id: str, **kwargs: Any) -> Device:
        if late.is_set():
            answering.set()
            await asyncio.sleep(0.3)  # the old channel closes meanwhile
        return await heartbeat(device_id, **kwargs)

    monkeypatch.setattr(broker.devices, "heartbeat", late_heartbeat)

    def rebuild() -> Stub:
        late.clear()
        closing.append(asyncio.create_task(channels[0].close()))
        channels.append(device_channel(target, cert_dir, GrpcConfig()))
        return edge_broker_pb2_grpc.EdgeBrokerServiceStub(channels[-1])

    first = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channels[0])
    renew = first.RenewCertificate

    async def renew_mid_heartbeat(request: object, **kwargs: object) -> object:
        async def streaming() -> bool:
            return stream_counts(server) == (0, 1)

        await wait_for(streaming)  # so there is a stream to move over
        late.set()
        await answering.wait()
        return await renew(request, **kwargs)  # type: ignore[arg-type]

    first.RenewCertificate = renew_mid_heartbeat  # type: ignore[assignment]
    # Renew at once: the certificate has less than this left.
    options = dataclasses.replace(AGENT, renew_certificate_before_seconds=10 * 86400)
    agent = EdgeAgent(first, options, cert_dir=cert_dir, rebuild_stub=rebuild)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    async def reopened() -> bool:
        return len(channels) == 2 and stream_counts(server) == (1, 1)

    await wait_for(reopened)  # the stream on the old channel ended, one is open
    await assert_heartbeating(database, "renewing")
    assert agent.fatal_error is None and not running.done()
    backoffs = [(r.getMessage(), getattr(r, "detail", "")) for r in caplog.records
                if r.getMessage().startswith("heartbeat stream failed")]
    assert not backoffs, backoffs
    stop.set()
    await running
    await asyncio.gather(*closing)
    for channel in channels:
        await channel.close()


async def test_a_stopping_broker_ends_its_streams_at_once_instead_of_after_the_grace(
    home: Path, database: Database
) -> None:
    """A heartbeat stream and a job watch never end by themselves: with a 30 s grace,
    the stop would wait 30 s and then cancel them. Draining ends both with
    UNAVAILABLE as the stop begins, so devices reconnect and the node stops quickly."""
    pki = TestPKI(home)
    broker = EdgeBroker.create(database.pool, CONFIG, home, pki.ca.edge_signer(), None)
    server = NodeServer(
        [registration(broker)], trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(grace_seconds=30), listen="127.0.0.1:0",
        credentials=pki.identity("broker", "server"), metrics_port=None,
    )
    await server.start()
    async with broker.background(), _stopped_on_failure(server):
        device = device_stub(pki, server.port, "drained")
        await register(device)
        stream = Stream(device)
        await stream.beat()
        admin = admin_stub(pki, server.port)
        job = (await admin.SubmitJob(pb.SubmitJobRequest(
            tenant_id="acme", kind="echo", type=pb.JOB_TYPE_BATCH, inline_payload=b"x"))).job
        watch = admin.WatchJob(pb.WatchJobRequest(job_id=job.job_id))
        await watch.read()  # the job as it is now; the watch then waits for changes
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 5
    for call in (stream.call, watch):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(caught.value.details())
    stream.close()


@contextlib.asynccontextmanager
async def _stopped_on_failure(server: NodeServer) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await server.stop(0)  # a no-op once the test has stopped it


async def test_an_unreachable_broker_is_logged_with_what_grpc_said(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No broker on the port: the agent's warning words the failure generally, and
    carries gRPC's own reason (the refused connection) for the operator; asked to
    stop while it still cannot register, the agent stops."""
    agent = EdgeAgent(device_stub(TestPKI(home), free_port(), "alone"), AGENT)
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))

    def retries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("broker unavailable")]

    async def retried() -> bool:
        return bool(retries())

    with caplog.at_level(logging.WARNING, logger="federation.edge.device.agent"):
        await wait_for(retried)
    stop.set()
    await asyncio.wait_for(running, timeout=5)  # it retried for ever before
    detail = retries()[0].detail  # type: ignore[attr-defined]
    assert "Connection refused" in detail, detail
