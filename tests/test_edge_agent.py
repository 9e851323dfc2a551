"""The reference agent against a real broker: certificate renewal and the generate kind."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federation.config import GrpcConfig
from federation.db import Database
from federation.edge.device import client as device_client
from federation.edge.device.agent import AgentOptions, EdgeAgent
from federation.edge.device.client import DeviceChannels, Stub, device_channel
from federation.errors import ErrorCode, FederationError
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc
from tests.edge_support import FAST_EDGE, admin_stub, broker_server, enroll_device, wait_for
from tests.support import TestPKI

FAST_AGENT = AgentOptions(poll_seconds=0.05, lease_seconds=5.0)


def _certificate(cert_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((cert_dir / "cert.pem").read_bytes())


async def _submit(
    admin: Stub, kind: str, payload: bytes, requirements: pb.JobRequirements | None = None
) -> str:
    request = pb.SubmitJobRequest(
        tenant_id="acme", kind=kind, type=pb.JOB_TYPE_BATCH, inline_payload=payload,
        requirements=requirements,
    )
    return str((await admin.SubmitJob(request)).job.job_id)


async def test_agent_renews_its_certificate_and_keeps_working(
    home: Path, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Enrolled for 12 s and told to renew with under 6 s left, the agent calls
    RenewCertificate about 6 s in, writes the new certificate and key, rebuilds its
    channel from them and goes on leasing through the new channel alone, even though
    closing the old channel cancelled a call it had in flight there."""
    pki = TestPKI(home)
    config = dataclasses.replace(
        FAST_EDGE, certificate_ttl_seconds=12.0,
        offline_after_intervals=100.0,  # the row lock below holds up heartbeats too
    )
    async with broker_server(pki, database, home, config) as (server, _, _):
        admin = admin_stub(pki, server.port)
        creds = await enroll_device(
            database.pool, pki, server.enrollment_port, "renewer", tmp_path / "renewer"
        )
        enrolled = _certificate(creds)
        # What `federation edge agent` uses; a short grace so the call held below
        # on the enrollment-time channel is cancelled when that channel retires.
        channels = DeviceChannels(f"localhost:{server.port}", creds, GrpcConfig(),
                                  retire_grace_seconds=0.5)
        rebuilt_at: list[dt.datetime] = []

        def rebuild() -> Stub:
            rebuilt_at.append(dt.datetime.now(dt.UTC))
            return channels.rebuild()

        agent = EdgeAgent(
            channels.stub(),
            dataclasses.replace(FAST_AGENT, renew_certificate_before_seconds=6.0),
            cert_dir=creds, rebuild_stub=rebuild,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            before = await _submit(admin, "echo", b"before")

            async def completed_before() -> bool:
                return before in agent.completed

            await wait_for(completed_before)

            async def old_channel_retired() -> bool:
                return channels.retired == 1

            async with database.pool.acquire() as conn, conn.transaction():
                # Hold the device row: the agent's next LeaseJobs, made on the
                # enrollment-time channel, waits in the broker until the renewal.
                await conn.execute(
                    "SELECT 1 FROM edge_devices WHERE device_id = 'renewer' FOR UPDATE"
                )
                assert not rebuilt_at  # not due yet: 12 s certificate, 6 s margin
                # Renewed, and the old channel closed after its grace, cancelling
                # the call still held there.
                await wait_for(old_channel_retired)
            # Not before it was due: under 6 s of the first certificate were left.
            left = enrolled.not_valid_after_utc - rebuilt_at[0]
            assert left < dt.timedelta(seconds=6), left
            fresh = _certificate(creds)
            assert fresh.serial_number != enrolled.serial_number
            assert fresh.not_valid_after_utc > enrolled.not_valid_after_utc
            assert fresh.subject == enrolled.subject  # the same device identity
            key = serialization.load_pem_private_key((creds / "key.pem").read_bytes(), None)
            assert fresh.public_key() == key.public_key()  # a new key, matching the cert
            assert fresh.public_key() != enrolled.public_key()

            after = await _submit(admin, "sha256", b"abc")

            async def completed_after() -> bool:
                return after in agent.completed

            await wait_for(completed_after)
        finally:
            stop.set()
            await running
            await channels.close()
        job = (await admin.GetJob(pb.GetJobRequest(job_id=after))).job
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempts == 1
        assert job.inline_result.startswith(b"sha256:ba7816bf")
        # The cancelled call was one failed lease, not the end of the work loop.
        assert "lease failed: the call was cancelled" in caplog.text


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama_cpp (the optional 'llm' extra) not installed")
async def test_generate_job_runs_on_the_embedded_model(home: Path, database: Database) -> None:
    """A `generate` job that requires the model is leased by an agent advertising it
    (the embedded SmolLM2 through llama.cpp) and completes with its text."""
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        admin = admin_stub(pki, server.port)
        job_id = await _submit(
            admin, "generate", b"Name the planet we live on.",
            requirements=pb.JobRequirements(local_models=["smollm2-135m-instruct"]),
        )
        channel = pki.channel(f"127.0.0.1:{server.port}", "edge", "llm-phone")
        agent = EdgeAgent(edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel), FAST_AGENT)
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))

        async def done() -> bool:
            return job_id in agent.completed or running.done()

        try:
            await wait_for(done, seconds=60)
        finally:
            stop.set()
            await running
            await channel.close()
        job = (await admin.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.last_error
    text = job.inline_result.decode()
    assert text.strip(), "the model produced no text"


async def test_an_agent_whose_loop_dies_stops_instead_of_looking_alive(
    home: Path, database: Database
) -> None:
    """Closing the agent's channel under it makes its next call a grpc UsageError, which
    no loop handles: the agent must stop with an error, not idle with a dead loop."""
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        channel = pki.channel(f"127.0.0.1:{server.port}", "edge", "fragile")
        agent = EdgeAgent(edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel), FAST_AGENT)
        running = asyncio.create_task(agent.run(asyncio.Event()))
        await asyncio.sleep(0.3)  # registered, heartbeating, polling for work
        assert not running.done()
        await channel.close()
        with pytest.raises(FederationError) as caught:
            await asyncio.wait_for(running, 10)
    assert caught.value.code is ErrorCode.INTERNAL
    assert "loop ended" in caught.value.message


async def test_a_renewal_cut_short_between_the_two_files_is_finished_on_load(
    home: Path, database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process dies after the new key is in place but before the new certificate:
    the next load finishes the swap, so key and certificate still belong together."""
    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        creds = await enroll_device(
            database.pool, pki, server.enrollment_port, "crashy", tmp_path / "crashy")
        channel = device_channel(f"localhost:{server.port}", creds, GrpcConfig())
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        replaced: list[str] = []
        real_replace = os.replace

        def crash_before_the_certificate(src: Any, dst: Any) -> None:
            if str(dst) == str(creds / "cert.pem"):
                raise KeyboardInterrupt("power cut")
            replaced.append(Path(dst).name)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crash_before_the_certificate)
        with pytest.raises(KeyboardInterrupt):
            await device_client.renew_certificate(stub, creds)
        monkeypatch.setattr(os, "replace", real_replace)
        await channel.close()
        assert replaced == ["key.pem.new", "cert.pem.new", "key.pem"]  # written, half swapped
        assert (creds / "cert.pem.new").exists()
        files = device_client.device_files(creds)  # what the next start of the agent does
        assert not (creds / "cert.pem.new").exists()
        key = serialization.load_pem_private_key(files.key.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        channel = device_channel(f"localhost:{server.port}", creds, GrpcConfig())
        await edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel).RegisterDevice(
            pb.RegisterDeviceRequest())  # and the broker accepts the pair
        await channel.close()


async def test_a_result_over_the_upload_quota_fails_the_job_at_once(
    home: Path, database: Database, tmp_path: Path
) -> None:
    """The agent cannot upload a large result because its device's upload quota is
    spent: it fails the job (retryable, the attempt counts) with the broker's reason,
    rather than holding the lease until it lapses as after a lost connection."""
    pki = TestPKI(home)
    config = dataclasses.replace(FAST_EDGE, upload_quota_bytes=1 << 20)
    async with broker_server(pki, database, home, config) as (server, _, _):
        admin = admin_stub(pki, server.port)
        payload = tmp_path / "payload.bin"
        payload.write_bytes(os.urandom(100 * 1024))  # echoed: a result above the inline limit
        digest = await device_client.upload_file(admin, payload)
        job_id = (await admin.SubmitJob(pb.SubmitJobRequest(
            tenant_id="acme", kind="echo", type=pb.JOB_TYPE_BATCH,
            payload_blob_digest=digest, max_attempts=2,
        ))).job.job_id
        channel = pki.channel(f"127.0.0.1:{server.port}", "edge", "full-phone")
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        start = pb.UploadStart(upload_id="held", total_size=1 << 20, sha256=bytes(32))
        await stub.Upload(iter([pb.UploadRequest(start=start)]))  # holds the whole quota
        agent = EdgeAgent(stub, FAST_AGENT)
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))

        async def dead() -> bool:
            job = (await admin.GetJob(pb.GetJobRequest(job_id=job_id))).job
            return job.state == pb.JOB_STATE_DEAD_LETTER or running.done()

        try:
            await wait_for(dead, seconds=30)
        finally:
            stop.set()
            await running
            await channel.close()
        job = (await admin.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert (job.state, job.attempts) == (pb.JOB_STATE_DEAD_LETTER, 2)
    assert job.last_error.startswith("result upload refused: ")
    assert "quota" in job.last_error
