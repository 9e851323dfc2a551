"""Every gRPC port is mTLS with identities from the federation CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import client_credentials, secure_channel
from federation.config import GrpcConfig
from federation.db import Database
from federation.inference.backend import BackendSet
from federation.inference.test_backend import TestBackend
from federation.logs import ContextFilter, JsonFormatter, request_id_var
from federation.memory.store import MemoryStore
from federation.server import NodeServer, ServiceRegistration
from federation.v1 import (
    council_pb2,
    council_pb2_grpc,
    guardian_pb2,
    guardian_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from nodes import guardian as guardian_service
from nodes import inference as inference_service
from tests.guardian_support import SwitchableSink, build_guardian
from tests.support import TestPKI, serving


@pytest.fixture
def guardian(pki: TestPKI, database: Database, store: MemoryStore) -> ServiceRegistration:
    """The real guardian service over the test's PostgreSQL, auditing to thermal memory."""
    custody, checkpoints = build_guardian(database, pki.home, SwitchableSink(store))
    return guardian_service.registration(guardian_service.GuardianServicer(custody, checkpoints))


@pytest.fixture
async def guardian_node(pki: TestPKI, guardian: ServiceRegistration
                        ) -> AsyncIterator[NodeServer]:
    async with serving(pki, [guardian], role="guardian") as server:
        yield server


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_federation_client_gets_serving(pki: TestPKI, guardian_node: NodeServer) -> None:
    async with pki.channel(f"127.0.0.1:{guardian_node.port}", "edge") as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert await _health(channel, "federation.v1.GuardianService") == (
            health_pb2.HealthCheckResponse.SERVING
        )


async def test_plaintext_client_is_refused(guardian_node: NodeServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guardian_node.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_without_certificate_is_refused(
    pki: TestPKI, guardian_node: NodeServer
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.paths.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{guardian_node.port}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki: TestPKI, guardian_node: NodeServer
) -> None:
    stranger = TestPKI(tmp_path / "other-home").identity("admin", "mallory")
    # Trust our server's CA so only the *client* certificate can be the problem.
    key, cert, _ = stranger.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.paths.ca_cert.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{guardian_node.port}", creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _health(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _tls_version(port: int, pki: TestPKI) -> str | None:
    files = pki.identity("admin", "probe")
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    context.load_cert_chain(str(files.cert), str(files.key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


async def test_server_negotiates_tls_1_3(pki: TestPKI, guardian_node: NodeServer) -> None:
    assert await asyncio.to_thread(_tls_version, guardian_node.port, pki) == "TLSv1.3"


async def test_role_not_allowed_is_denied_and_logged(
    pki: TestPKI, guardian_node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="federation.interceptor")
    caplog.handler.addFilter(ContextFilter())
    async with pki.channel(f"127.0.0.1:{guardian_node.port}", "edge", "phone-7") as channel:
        stub = guardian_pb2_grpc.GuardianServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReleaseShare(
                guardian_pb2.ReleaseShareRequest(tenant_id="t"), timeout=5,
                metadata=(("x-request-id", "req-denied-1"),),
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "GuardianService/ReleaseShare" in (info.value.details() or "")
    denied = [r for r in caplog.records if r.getMessage() == "permission denied"]
    assert denied and denied[0].__dict__["caller"] == "spiffe://federation.local/edge/phone-7"
    # The request id travelled in gRPC metadata into the log record.
    assert denied[0].__dict__["request_id"] == "req-denied-1"
    line = json.loads(JsonFormatter("test").format(denied[0]))
    assert line["request_id"] == "req-denied-1" and line["caller"].endswith("/edge/phone-7")


async def test_allowed_role_reaches_the_service(pki: TestPKI, guardian_node: NodeServer) -> None:
    """The gateway may call ListShares: authz passes and the guardian answers."""
    async with pki.channel(f"127.0.0.1:{guardian_node.port}", "gateway") as channel:
        stub = guardian_pb2_grpc.GuardianServiceStub(channel)
        reply = await stub.ListShares(guardian_pb2.ListSharesRequest(tenant_id="t"), timeout=5)
    assert list(reply.shares) == []


async def test_a_connection_outliving_its_certificate_is_refused(
    pki: TestPKI, guardian_node: NodeServer
) -> None:
    """TLS checked the certificate at the handshake; the interceptor checks it on every
    call, so a connection kept open past the certificate's expiry stops working."""
    files = pki.ca.issue("gateway", "short-lived", validity=dt.timedelta(seconds=2))
    not_after = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
    async with secure_channel(f"127.0.0.1:{guardian_node.port}", files, GrpcConfig()) as channel:
        stub = guardian_pb2_grpc.GuardianServiceStub(channel)
        request = guardian_pb2.ListSharesRequest(tenant_id="t")
        await stub.ListShares(request, timeout=5)  # valid: authorized and answered
        await asyncio.sleep((not_after - dt.datetime.now(dt.UTC)).total_seconds() + 0.2)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListShares(request, timeout=5)  # the same, still open connection
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "certificate expired" in (info.value.details() or "")


async def test_metrics_endpoint_counts_denials(pki: TestPKI, guardian_node: NodeServer) -> None:
    async with pki.channel(f"127.0.0.1:{guardian_node.port}", "edge") as channel:
        stub = council_pb2_grpc.CouncilServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.VoteUnary(council_pb2.VoteUnaryRequest(question="q"), timeout=5)
    url = f"http://127.0.0.1:{guardian_node.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.text()
    assert resp.status == 200
    # The guardian node does not host the council: the call is UNIMPLEMENTED there,
    # and counted under its own method.
    assert "federation_grpc_server_handled_total" in body


async def test_insecure_dev_serves_plaintext(pki: TestPKI, guardian: ServiceRegistration) -> None:
    server = NodeServer(
        [guardian],
        trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(),
        listen="127.0.0.1:0",
        credentials=None,
        metrics_port=None,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_client_credentials_helper_builds_mtls(
    pki: TestPKI, guardian_node: NodeServer
) -> None:
    creds = client_credentials(pki.identity("admin", "ops"))
    async with grpc.aio.secure_channel(f"127.0.0.1:{guardian_node.port}", creds) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_request_id_travels_on_unary_and_streaming_calls(
    pki: TestPKI, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller's request id (a context variable) reaches the server's logs, all call kinds."""
    caplog.set_level(logging.WARNING, logger="federation.interceptor")
    caplog.handler.addFilter(ContextFilter())
    token = request_id_var.set("req-from-caller")
    inference = inference_service.registration(
        inference_service.InferenceServicer(BackendSet([TestBackend()])))
    try:
        async with serving(pki, [inference], role="inference") as node, \
                pki.channel(f"127.0.0.1:{node.port}", "edge") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stub.Generate(inference_pb2.GenerateRequest(model="m"), timeout=5):
                    pass
    finally:
        request_id_var.reset(token)
    denied = [r for r in caplog.records if r.getMessage() == "permission denied"]
    assert [r.__dict__["method"].rsplit("/", 1)[1] for r in denied] == ["ListModels", "Generate"]
    assert {r.__dict__["request_id"] for r in denied} == {"req-from-caller"}
