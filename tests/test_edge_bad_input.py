"""Malformed requests to the broker over mTLS: each gets a precise status naming the
field, never INTERNAL (values PostgreSQL cannot store included)."""

from __future__ import annotations

import grpc
import pytest

from federation.errors import PARAM_METADATA
from federation.v1 import edge_broker_pb2 as pb
from tests.edge_support import BrokerNode, admin_stub, device_stub, register
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
