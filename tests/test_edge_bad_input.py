"""Malformed requests to the broker over mTLS: each gets a precise status naming the
field, never INTERNAL (values PostgreSQL cannot store included)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from federation.cli.edge import list_jobs
from federation.config import ConfigError, EdgeConfig, GrpcConfig
from federation.db import Database
from federation.edge.broker import check_limits
from federation.edge.checksum import crc32c
from federation.edge.device.client import enroll
from federation.edge.enrollment import create_token
from federation.errors import PARAM_METADATA, ErrorCode, FederationError
from federation.v1 import edge_broker_pb2 as pb
from tests.edge_support import BrokerNode, Stub, admin_stub, device_stub, register
from tests.support import TestPKI

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    """The status code and the ``error-param`` trailer of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    trailers = dict(caught.value.trailing_metadata() or ())
    return caught.value.code(), str(trailers.get(PARAM_METADATA, ""))


def job(**fields: object) -> pb.SubmitJobRequest:
    request = pb.SubmitJobRequest(tenant_id="t1", kind="echo", type=pb.JOB_TYPE_BATCH,
                                  inline_payload=b"x")
    for name, value in fields.items():
        setattr(request, name, value)
    return request


async def test_integers_the_tables_cannot_hold_are_invalid_arguments(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    phone, ops = device_stub(pki, server.port, "phone"), admin_stub(pki, server.port)
    for caps, param in (
        (pb.DeviceCapabilities(cpu_cores=UINT32_MAX), "cpu_cores"),
        (pb.DeviceCapabilities(memory_bytes=UINT64_MAX), "memory_bytes"),
        (pb.DeviceCapabilities(network_type=70000), "network_type"),  # type: ignore[arg-type]
    ):
        assert await refused(phone.RegisterDevice(pb.RegisterDeviceRequest(
            capabilities=caps))) == (grpc.StatusCode.INVALID_ARGUMENT, param)
    for requirements, param in (
        (pb.JobRequirements(min_cpu_cores=UINT32_MAX), "min_cpu_cores"),
        (pb.JobRequirements(min_memory_bytes=UINT64_MAX), "min_memory_bytes"),
    ):
        request = job()
        request.requirements.CopyFrom(requirements)
        assert await refused(ops.SubmitJob(request)) == (
            grpc.StatusCode.INVALID_ARGUMENT, param)
    assert await refused(ops.SubmitJob(job(max_attempts=UINT32_MAX))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "max_attempts")

    await register(phone)
    await ops.SubmitJob(job())
    lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
    job_id = lease.job.job_id
    for call in (
        phone.RenewLease(pb.RenewLeaseRequest(job_id=job_id, fencing_token=UINT64_MAX)),
        phone.CompleteJob(pb.CompleteJobRequest(job_id=job_id, fencing_token=UINT64_MAX,
                                                inline_result=b"r")),
        phone.FailJob(pb.FailJobRequest(job_id=job_id, fencing_token=UINT64_MAX, error="e")),
    ):
        assert await refused(call) == (grpc.StatusCode.INVALID_ARGUMENT, "fencing_token")
    # The lease is untouched and still completes with its own token.
    done = await phone.CompleteJob(pb.CompleteJobRequest(
        job_id=job_id, fencing_token=lease.fencing_token, inline_result=b"r"))
    assert done.job.state == pb.JOB_STATE_SUCCEEDED


async def test_nul_characters_are_invalid_arguments(
    pki: TestPKI, broker_node: BrokerNode, database: Database, tmp_path: Path
) -> None:
    """PostgreSQL text cannot hold NUL; protobuf strings can."""
    server, broker = broker_node
    phone, ops = device_stub(pki, server.port, "phone"), admin_stub(pki, server.port)
    assert await refused(phone.RegisterDevice(pb.RegisterDeviceRequest(
        capabilities=pb.DeviceCapabilities(sensors=["cam\x00"])))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "sensors")
    for field in ("tenant_id", "kind"):
        assert await refused(ops.SubmitJob(job(**{field: "a\x00b"}))) == (
            grpc.StatusCode.INVALID_ARGUMENT, field)
    assert await refused(ops.ListJobs(pb.ListJobsRequest(tenant_id="t\x00"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "tenant_id")

    await register(phone)
    await ops.SubmitJob(job())
    lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
    job_id = lease.job.job_id
    assert await refused(phone.FailJob(pb.FailJobRequest(
        job_id=job_id, fencing_token=lease.fencing_token, error="boom\x00"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "error")
    assert await refused(ops.CancelJob(pb.CancelJobRequest(job_id=job_id, reason="\x00"))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "reason")
    assert (await broker.queue.get(job_id)).state.value == "leased"  # nothing changed

    assert await refused(phone.QueryUploadStatus(pb.QueryUploadStatusRequest(
        upload_id="u\x00"))) == (grpc.StatusCode.INVALID_ARGUMENT, "upload_id")

    async def opening() -> AsyncIterator[pb.UploadRequest]:
        yield pb.UploadRequest(start=pb.UploadStart(
            upload_id="u\x00", total_size=0, sha256=hashlib.sha256(b"").digest()))

    assert await refused(phone.Upload(opening())) == (
        grpc.StatusCode.INVALID_ARGUMENT, "upload_id")

    token = await create_token(database.pool, "newphone", dt.timedelta(minutes=5), actor="ops")
    ca = pki.ca.paths.ca_cert.read_bytes()
    target = f"localhost:{server.enrollment_port}"
    with pytest.raises(FederationError) as caught:
        await enroll(target, ca, token, "Pixel\x00", tmp_path)
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_ARGUMENT, "device_name")
    await enroll(target, ca, token, "Pixel", tmp_path)  # the token was not spent


async def test_timestamps_python_cannot_represent_are_invalid_arguments(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    phone, ops = device_stub(pki, server.port, "phone"), admin_stub(pki, server.port)
    far = Timestamp(seconds=2**62)
    request = job()
    request.deadline.CopyFrom(far)
    assert await refused(ops.SubmitJob(request)) == (grpc.StatusCode.INVALID_ARGUMENT, "deadline")
    await register(phone)
    assert await refused(phone.Heartbeat(pb.HeartbeatRequest(echo_time=far))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "echo_time")
    beats = phone.HeartbeatStream()
    await beats.write(pb.HeartbeatStreamRequest(heartbeat=pb.HeartbeatRequest(
        echo_time=Timestamp(seconds=0, nanos=-1))))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await beats.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_result_blob_must_have_been_uploaded(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    """Else the job SUCCEEDED with a result nobody can download: the output is lost."""
    server, broker = broker_node
    phone = await phone_with_a_queued_job(pki, server.port)
    lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
    result = b"the transcript"
    digest = "sha256:" + hashlib.sha256(result).hexdigest()
    complete = pb.CompleteJobRequest(job_id=lease.job.job_id, fencing_token=lease.fencing_token,
                                     result_blob_digest=digest)
    assert await refused(phone.CompleteJob(complete)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "result_blob_digest")
    assert (await broker.queue.get(lease.job.job_id)).state.value == "leased"

    async def upload() -> AsyncIterator[pb.UploadRequest]:
        yield pb.UploadRequest(start=pb.UploadStart(
            upload_id="result", total_size=len(result), sha256=hashlib.sha256(result).digest()))
        yield pb.UploadRequest(chunk=pb.UploadChunk(offset=0, data=result,
                                                    crc32c=crc32c(result)))
        yield pb.UploadRequest(finish=True)

    assert (await phone.Upload(upload())).blob_digest == digest
    done = await phone.CompleteJob(complete)
    assert done.job.result_blob_digest == digest


async def test_list_jobs_refuses_a_state_that_does_not_exist(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    ops = admin_stub(pki, server.port)
    await ops.SubmitJob(job())
    listing = pb.ListJobsRequest(tenant_id="t1", state=99)  # type: ignore[arg-type]
    assert await refused(ops.ListJobs(listing)) == (grpc.StatusCode.INVALID_ARGUMENT, "state")
    pending = await ops.ListJobs(pb.ListJobsRequest(tenant_id="t1", state=pb.JOB_STATE_PENDING))
    assert len(pending.jobs) == 1


async def test_answers_for_a_lease_say_exactly_what_is_wrong(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    phone, thief = device_stub(pki, server.port, "phone"), device_stub(pki, server.port, "thief")
    ops = admin_stub(pki, server.port)
    await register(phone)
    await register(thief)
    await ops.SubmitJob(job())
    lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
    job_id, token = lease.job.job_id, lease.fencing_token

    def complete(token: int, job_id: str = job_id) -> pb.CompleteJobRequest:
        return pb.CompleteJobRequest(job_id=job_id, fencing_token=token, inline_result=b"r")

    # Another device presenting the holder's own token: not a stale answer, a foreign one.
    assert await refused(thief.CompleteJob(complete(token))) == (
        grpc.StatusCode.PERMISSION_DENIED, "job_id")
    assert await refused(thief.RenewLease(pb.RenewLeaseRequest(
        job_id=job_id, fencing_token=token))) == (grpc.StatusCode.PERMISSION_DENIED, "job_id")
    assert await refused(phone.CompleteJob(complete(token + 1))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "fencing_token")
    assert await refused(phone.CompleteJob(complete(token, "5b7fb7a4-0000-4000-8000-"
                                                           "000000000000"))) == (
        grpc.StatusCode.NOT_FOUND, "job_id")
    await phone.CompleteJob(complete(token))
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await phone.CompleteJob(complete(token))
    assert twice.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "already succeeded" in str(twice.value.details())


async def test_a_heartbeat_load_must_be_a_number(pki: TestPKI, broker_node: BrokerNode) -> None:
    server, broker = broker_node
    phone = device_stub(pki, server.port, "phone")
    await register(phone)
    await phone.Heartbeat(pb.HeartbeatRequest(load=0.5))
    for load in (float("nan"), float("inf")):
        assert await refused(phone.Heartbeat(pb.HeartbeatRequest(load=load))) == (
            grpc.StatusCode.INVALID_ARGUMENT, "load")
    assert (await broker.devices.get("phone")).load == 0.5


def test_size_limits_must_fit_a_grpc_message() -> None:
    check_limits(EdgeConfig(), GrpcConfig())  # the defaults
    for edge, grpc_config, setting in (
        (EdgeConfig(chunk_max_bytes=8 << 20), GrpcConfig(), "edge.chunk_max_bytes"),
        (EdgeConfig(inline_payload_max_bytes=4 << 20), GrpcConfig(),
         "edge.inline_payload_max_bytes"),
        (EdgeConfig(), GrpcConfig(max_message_bytes=1 << 20), "edge.chunk_max_bytes"),
        (EdgeConfig(chunk_min_bytes=2 << 20), GrpcConfig(), "edge.chunk_min_bytes"),
        (EdgeConfig(max_open_jobs_per_tenant=0), GrpcConfig(), "edge.max_open_jobs_per_tenant"),
    ):
        with pytest.raises(ConfigError, match=setting):
            check_limits(edge, grpc_config)
    check_limits(EdgeConfig(chunk_max_bytes=8 << 20), GrpcConfig(max_message_bytes=16 << 20))


async def test_jobs_list_gives_the_operator_limit_across_pages(
    pki: TestPKI, broker_node: BrokerNode, database: Database
) -> None:
    """`federation edge jobs list --limit N` asked for one page of N, and the broker caps a
    page at 1000: beyond that the listing was cut short without a word."""
    server, _ = broker_node
    await database.pool.execute(
        "INSERT INTO edge_jobs (tenant_id, job_id, kind, job_type, max_attempts, "
        "inline_payload, created_at) SELECT 't1', gen_random_uuid(), 'echo', 2, 1, 'x', "
        "now() - make_interval(secs => n) FROM generate_series(1, 1203) AS n")
    ops = admin_stub(pki, server.port)
    listed = await list_jobs(ops, pb.ListJobsRequest(tenant_id="t1"), 1100)
    assert len(listed) == len({job.job_id for job in listed}) == 1100
    assert len(await list_jobs(ops, pb.ListJobsRequest(tenant_id="t1"), 5000)) == 1203
    assert len(await list_jobs(ops, pb.ListJobsRequest(tenant_id="t1"), 7)) == 7


async def test_query_upload_status_refuses_an_id_no_upload_can_have(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    phone = device_stub(pki, server.port, "phone")
    for upload_id in ("", "u" * 129):
        assert await refused(phone.QueryUploadStatus(pb.QueryUploadStatusRequest(
            upload_id=upload_id))) == (grpc.StatusCode.INVALID_ARGUMENT, "upload_id")
    assert await refused(phone.QueryUploadStatus(pb.QueryUploadStatusRequest(
        upload_id="never-started"))) == (grpc.StatusCode.NOT_FOUND, "upload_id")


async def test_a_negative_lease_length_is_refused_not_defaulted(
    pki: TestPKI, broker_node: BrokerNode
) -> None:
    server, _ = broker_node
    phone = await phone_with_a_queued_job(pki, server.port)
    backwards = Duration(seconds=-30)
    assert await refused(phone.LeaseJobs(pb.LeaseJobsRequest(lease_duration=backwards))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "lease_duration")
    lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
    assert await refused(phone.RenewLease(pb.RenewLeaseRequest(
        job_id=lease.job.job_id, fencing_token=lease.fencing_token, extension=backwards))) == (
        grpc.StatusCode.INVALID_ARGUMENT, "extension")


async def phone_with_a_queued_job(pki: TestPKI, port: int) -> Stub:
    """A registered phone's stub, with one job submitted by an operator for it to lease."""
    phone = device_stub(pki, port, "phone")
    await register(phone)
    await admin_stub(pki, port).SubmitJob(job())
    return phone
