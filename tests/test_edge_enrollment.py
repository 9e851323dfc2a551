"""Enrollment over the anonymous TLS port, revocation, and who may call what."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncpg
import grpc
import pytest
from cryptography import x509

from federation import authz
from federation.config import GrpcConfig
from federation.db import Database
from federation.edge.device.client import device_channel, device_files, enroll, new_key_and_csr
from federation.edge.enrollment import create_token
from federation.errors import ErrorCode, FederationError
from federation.memory.store import MemoryStore
from federation.v1 import (
    edge_broker_pb2 as pb,
)
from federation.v1 import (
    edge_broker_pb2_grpc,
    guardian_pb2,
    guardian_pb2_grpc,
    key_authority_pb2,
    key_authority_pb2_grpc,
)
from tests.edge_support import BrokerNode, broker_server, device_stub, register
from tests.guardian_support import SwitchableSink, build_guardian, start_guardian
from tests.keys_support import key_nodes
from tests.support import TestPKI


def test_unauthenticated_methods_are_exactly_enroll() -> None:
    assert authz.UNAUTHENTICATED_METHODS == ("/federation.v1.EdgeBrokerService/Enroll",)


async def test_enroll_then_call_then_token_reuse_refused(
    pki: TestPKI, broker_node: BrokerNode, database: Database, tmp_path: Path
) -> None:
    server, _ = broker_node
    token = await create_token(database.pool, "pixel-8", dt.timedelta(minutes=10), actor="ops")
    ca_pem = pki.ca.paths.ca_cert.read_bytes()
    target = f"localhost:{server.enrollment_port}"
    out = tmp_path / "device"
    reply = await enroll(target, ca_pem, token, "Pixel 8 (lab)", out)
    assert reply.device_id == "pixel-8"
    files = device_files(out)
    assert files.identity.spiffe_id == "spiffe://federation.local/edge/pixel-8"
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == []  # nothing beyond the identity
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert lifetime <= dt.timedelta(seconds=86400)
    assert (files.key.stat().st_mode & 0o077) == 0
    # The enrolled device reaches the broker on the mTLS port.
    async with device_channel(f"localhost:{server.port}", out, GrpcConfig()) as channel:
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        reply_reg = await stub.RegisterDevice(pb.RegisterDeviceRequest())
        assert reply_reg.device.device_id == "pixel-8"
        assert reply_reg.device.name == "Pixel 8 (lab)"
    with pytest.raises(FederationError) as reused:
        await enroll(target, ca_pem, token, "again", tmp_path / "again")
    assert reused.value.code is ErrorCode.UNAUTHENTICATED
    assert "already used" in reused.value.message


async def test_expired_and_unknown_tokens_refused(
    pki: TestPKI, broker_node: BrokerNode, database: Database, tmp_path: Path
) -> None:
    server, _ = broker_node
    token = await create_token(database.pool, "old", dt.timedelta(milliseconds=50), actor="ops")
    await asyncio.sleep(0.1)
    ca_pem = pki.ca.paths.ca_cert.read_bytes()
    target = f"localhost:{server.enrollment_port}"
    with pytest.raises(FederationError) as expired:
        await enroll(target, ca_pem, token, "old", tmp_path / "a")
    assert expired.value.code is ErrorCode.UNAUTHENTICATED
    assert "expired" in expired.value.message
    with pytest.raises(FederationError) as unknown:
        await enroll(target, ca_pem, "fedenroll_nope", "x", tmp_path / "b")
    assert "not valid" in unknown.value.message
    assert not (tmp_path / "a" / "key.pem").exists()


async def test_anonymous_caller_reaches_only_enroll(pki: TestPKI, broker_node: BrokerNode) -> None:
    server, _ = broker_node
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.paths.ca_cert.read_bytes()
    )
    target = f"localhost:{server.enrollment_port}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.LeaseJobs(pb.LeaseJobsRequest())
        assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as denied_submit:
            await stub.SubmitJob(pb.SubmitJobRequest())
        assert denied_submit.value.code() is grpc.StatusCode.UNAUTHENTICATED
        _, csr = new_key_and_csr()
        with pytest.raises(grpc.aio.AioRpcError) as bad_token:
            await stub.Enroll(pb.EnrollRequest(token="x", csr_der=csr))
        assert bad_token.value.code() is grpc.StatusCode.UNAUTHENTICATED  # reached Enroll
    # Without a client certificate the main port refuses at the TLS handshake.
    async with grpc.aio.secure_channel(f"localhost:{server.port}", credentials) as channel:
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as handshake:
            await stub.Enroll(pb.EnrollRequest(), timeout=5)
        assert handshake.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_revoked_device_refused_on_next_call(
    pki: TestPKI, broker_node: BrokerNode, database: Database
) -> None:
    server, broker = broker_node
    stub = device_stub(pki, server.port, "lost-phone")
    await register(stub)
    await stub.Heartbeat(pb.HeartbeatRequest(battery_percent=50))
    await broker.devices.revoke("lost-phone", actor="ops")
    for call in (
        stub.Heartbeat(pb.HeartbeatRequest()),
        stub.LeaseJobs(pb.LeaseJobsRequest()),
        stub.QueryUploadStatus(pb.QueryUploadStatusRequest(upload_id="u")),
        stub.RegisterDevice(pb.RegisterDeviceRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(FederationError) as no_token:
        await create_token(database.pool, "lost-phone", dt.timedelta(minutes=1), actor="ops")
    assert no_token.value.code is ErrorCode.FAILED_PRECONDITION


async def test_certificate_renewal_issues_a_fresh_cert(
    home: Path, database: Database, tmp_path: Path
) -> None:
    from federation.edge.device.client import renew_certificate

    pki = TestPKI(home)
    async with broker_server(pki, database, home) as (server, _, _):
        token = await create_token(database.pool, "renewer", dt.timedelta(minutes=1), actor="ops")
        out = tmp_path / "renewer"
        await enroll(f"localhost:{server.enrollment_port}",
                     pki.ca.paths.ca_cert.read_bytes(), token, "", out)
        before = (out / "cert.pem").read_bytes()
        async with device_channel(f"localhost:{server.port}", out, GrpcConfig()) as channel:
            await renew_certificate(edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel), out)
        assert (out / "cert.pem").read_bytes() != before
        async with device_channel(f"localhost:{server.port}", out, GrpcConfig()) as channel:
            stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
            assert (await stub.RegisterDevice(pb.RegisterDeviceRequest())).device.device_id == (
                "renewer"
            )


async def test_edge_certificate_cannot_reach_guardian_or_keys(
    home: Path, database: Database, store: MemoryStore
) -> None:
    pki = TestPKI(home)
    custody, checkpoints = build_guardian(database, home, SwitchableSink(store))
    guardian_node = await start_guardian(pki, custody, checkpoints)
    try:
        async with key_nodes(pki, database) as key_authority, \
                pki.channel(guardian_node.address, "edge", "phone") as to_guardian, \
                pki.channel(key_authority.keys_address, "edge", "phone") as to_keys:
            guardian = guardian_pb2_grpc.GuardianServiceStub(to_guardian)
            with pytest.raises(grpc.aio.AioRpcError) as g:
                await guardian.ListShares(guardian_pb2.ListSharesRequest())
            assert g.value.code() is grpc.StatusCode.PERMISSION_DENIED
            keys = key_authority_pb2_grpc.KeyAuthorityServiceStub(to_keys)
            with pytest.raises(grpc.aio.AioRpcError) as k:
                await keys.VerifyKey(key_authority_pb2.VerifyKeyRequest())
            assert k.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await guardian_node.server.stop(0)



_REFUSE_AUDIT = """
CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the audit outbox refuses writes'; END $$;
CREATE TRIGGER refuse_audit BEFORE INSERT ON edge_audit_outbox
FOR EACH ROW EXECUTE FUNCTION refuse_audit();
"""


async def test_credentials_are_audited_and_none_is_issued_unrecorded(
    pki: TestPKI, broker_node: BrokerNode, database: Database, tmp_path: Path
) -> None:
    """Token issue, enrollment and renewal hand out credentials: each is in thermal
    memory, and when its record cannot be written the credential is not handed out
    (an enrollment token is then not spent)."""
    from federation.edge.device.client import renew_certificate

    server, _ = broker_node
    target = f"localhost:{server.enrollment_port}"
    ca_pem = pki.ca.paths.ca_cert.read_bytes()
    await database.pool.execute(_REFUSE_AUDIT)
    with pytest.raises(asyncpg.RaiseError):
        await create_token(database.pool, "audited", dt.timedelta(minutes=1), actor="ops")
    await database.pool.execute("ALTER TABLE edge_audit_outbox DISABLE TRIGGER refuse_audit")
    token = await create_token(database.pool, "audited", dt.timedelta(minutes=1), actor="ops")
    await database.pool.execute("ALTER TABLE edge_audit_outbox ENABLE TRIGGER refuse_audit")
    out = tmp_path / "audited"
    with pytest.raises(FederationError) as unrecorded:
        await enroll(target, ca_pem, token, "", out)
    assert unrecorded.value.code is ErrorCode.INTERNAL
    assert not (out / "cert.pem").exists()
    await database.pool.execute("DROP TRIGGER refuse_audit ON edge_audit_outbox")
    await enroll(target, ca_pem, token, "", out)  # the same token: it was not spent
    async with device_channel(f"localhost:{server.port}", out, GrpcConfig()) as channel:
        await renew_certificate(edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel), out)

    device = "spiffe://federation.local/edge/audited"
    expected = [("ops", "edge.token.issue"), (device, "edge.device.enroll"),
                (device, "edge.device.renew")]

    async def recorded() -> list[tuple[str, str]]:
        rows = await database.pool.fetch(
            "SELECT actor, action FROM memory_records WHERE subject = 'audited' "
            "ORDER BY sequence")
        return [(r["actor"], r["action"]) for r in rows]

    for _ in range(200):
        if await recorded() == expected:
            break
        await asyncio.sleep(0.02)
    assert await recorded() == expected


async def test_registration_is_audited_as_the_device(
    pki: TestPKI, broker_node: BrokerNode, database: Database
) -> None:
    """RegisterDevice reaches thermal memory under the caller's identity; heartbeats of
    the online device that follow add no record."""
    server, _ = broker_node
    stub = device_stub(pki, server.port, "cam")
    await register(stub)
    for _ in range(3):
        await stub.Heartbeat(pb.HeartbeatRequest(battery_percent=50))

    async def recorded() -> list[tuple[str, str]]:
        rows = await database.pool.fetch(
            "SELECT actor, action FROM memory_records WHERE subject = 'cam' ORDER BY sequence")
        return [(r["actor"], r["action"]) for r in rows]

    async def outbox_rows() -> int:
        return int(await database.pool.fetchval("SELECT count(*) FROM edge_audit_outbox"))

    expected = [("spiffe://federation.local/edge/cam", "edge.device.register")]
    # The outbox row is deleted once thermal memory has the record: a moment after it.
    for _ in range(200):
        if await recorded() == expected and not await outbox_rows():
            break
        await asyncio.sleep(0.02)
    assert await recorded() == expected
    assert not await outbox_rows()
