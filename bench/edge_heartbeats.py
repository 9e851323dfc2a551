"""Heartbeats/s of ``bench/edge.py``: 1,000 simulated devices in one process, each
with its own certificate and mTLS channel, against the broker (unary ``Heartbeat``
and ``HeartbeatStream``) and against raw gRPC echo baselines on the same number of
channels. Run through ``bench/edge.py --only heartbeats``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from federation.channels import secure_channel
from federation.config import GrpcConfig
from federation.pki import CertificateAuthority, CertificateFiles
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc

ECHO = "/bench.Sink/Echo"
ECHO_STREAM = "/bench.Sink/EchoStream"
"""The raw baselines' methods, served by ``bench/edge.py``'s child process."""


def device_channel(port: int, files: CertificateFiles, config: GrpcConfig) -> grpc.aio.Channel:
    return secure_channel(f"localhost:{port}", files, config, forward_request_id=False)


async def bench_heartbeats(
    ports: dict[str, int], ca: CertificateAuthority, devices: int, seconds: float
) -> list[str]:
    config = GrpcConfig()
    files = [ca.issue("edge", f"hb-{n}") for n in range(devices)]
    raw = [device_channel(ports["tls"], f, config) for f in files]
    raw_unary = await _closed_loop(seconds, [_raw_unary(c) for c in raw])
    raw_stream = await _closed_loop(seconds, [_raw_stream(c) for c in raw])
    await asyncio.gather(*(c.close() for c in raw))
    channels = [device_channel(ports["broker"], f, config) for f in files]
    stubs = [edge_broker_pb2_grpc.EdgeBrokerServiceStub(c) for c in channels]
    await asyncio.gather(*(s.RegisterDevice(pb.RegisterDeviceRequest()) for s in stubs))
    unary = await _closed_loop(seconds, [_unary_heartbeats(s) for s in stubs])
    streamed = await _closed_loop(seconds, [_streamed_heartbeats(s) for s in stubs])
    await asyncio.gather(*(c.close() for c in channels))
    where = f"{devices} mTLS channels"
    return [
        f"| unary calls, {where} | raw gRPC echo | {raw_unary:8.0f} calls/s |",
        f"| streamed messages, {where}, one stream each | raw gRPC echo | "
        f"{raw_stream:8.0f} messages/s |",
        f"| heartbeats, {devices} devices in one process | unary Heartbeat, mTLS + PostgreSQL | "
        f"{unary:8.0f} heartbeats/s |",
        f"| heartbeats, {devices} devices in one process | HeartbeatStream, mTLS + PostgreSQL | "
        f"{streamed:8.0f} heartbeats/s |",
    ]


class _Clock:
    """Starts timing once every device has made one round trip (connection, TLS
    handshake, stream set-up), then lets them run for ``seconds``."""

    def __init__(self, devices: int, seconds: float) -> None:
        self._warming = devices
        self._ready = asyncio.Event()
        self._seconds = seconds
        self.started = 0.0

    async def run(self, round_trip: Callable[[], Awaitable[None]]) -> int:
        """One device, closed loop: its next message once the last is answered."""
        await round_trip()
        self._warming -= 1
        if not self._warming:
            self.started = time.perf_counter()
            self._ready.set()
        await self._ready.wait()
        count = 0
        while time.perf_counter() < self.started + self._seconds:
            await round_trip()
            count += 1
        return count


Device = Callable[[_Clock], Awaitable[int]]


async def _closed_loop(seconds: float, devices: list[Device]) -> float:
    """Round trips/s of all devices together."""
    clock = _Clock(len(devices), seconds)
    counts = await asyncio.gather(*(device(clock) for device in devices))
    return sum(counts) / (time.perf_counter() - clock.started)


def _heartbeat(echo: Any) -> pb.HeartbeatRequest:
    request = pb.HeartbeatRequest(battery_percent=80, load=0.2)
    if echo is not None:
        request.echo_time.CopyFrom(echo)
    return request


def _raw_unary(channel: grpc.aio.Channel) -> Device:
    call: Any = channel.unary_unary(ECHO)

    async def round_trip() -> None:
        await call(b"battery=80 load=0.2")

    async def device(clock: _Clock) -> int:
        return await clock.run(round_trip)

    return device


def _raw_stream(channel: grpc.aio.Channel) -> Device:
    async def device(clock: _Clock) -> int:
        call: Any = channel.stream_stream(ECHO_STREAM)()

        async def round_trip() -> None:
            await call.write(b"battery=80 load=0.2")
            await call.read()

        count = await clock.run(round_trip)
        await call.done_writing()
        return count

    return device


def _unary_heartbeats(stub: Any) -> Device:
    async def device(clock: _Clock) -> int:
        echo = None

        async def round_trip() -> None:
            nonlocal echo
            echo = (await stub.Heartbeat(_heartbeat(echo))).server_time

        return await clock.run(round_trip)

    return device


def _streamed_heartbeats(stub: Any) -> Device:
    async def device(clock: _Clock) -> int:
        call = stub.HeartbeatStream()
        echo = None

        async def round_trip() -> None:
            nonlocal echo
            await call.write(pb.HeartbeatStreamRequest(heartbeat=_heartbeat(echo)))
            echo = (await call.read()).heartbeat.server_time

        count = await clock.run(round_trip)
        await call.done_writing()
        return count

    return device
