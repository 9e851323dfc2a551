"""Renewal without downtime: ``federation pki renew`` replaces the files, and a running
node serves the new certificate from its next handshake while calls in flight go on;
a client channel presents its renewed certificate on its next calls.

The certificates here live a few seconds, so "without the reload this would fail" is
observed directly: past the old certificate's expiry a new handshake (server side) or
a new call (client side, checked by the interceptor) only works with the new one.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from federation.channel_renewal import CHECK_INTERVAL_SECONDS
from federation.channels import secure_channel
from federation.config import GrpcConfig
from federation.credentials import CertificateWatch
from federation.inference.backend import BackendSet
from federation.inference.test_backend import TestBackend
from federation.pki import NODES, leaf_certificate, renew_identities
from federation.server import NodeServer
from federation.v1 import inference_pb2, inference_pb2_grpc
from nodes.inference import InferenceServicer, registration
from tests.pki_support import mint
from tests.support import TRUST_DOMAIN, TestPKI

LIFETIME = dt.timedelta(seconds=4)
WORDS = 40
"""Tokens of the long stream: 40 × 0.15 s = 6 s, longer than the old certificate lives."""


def _request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="test-model", messages=[inference_pb2.ChatMessage(
            role=inference_pb2.CHAT_ROLE_USER, content=" ".join(["word"] * WORDS))])


async def _sleep_past(expiry: dt.datetime) -> None:
    await asyncio.sleep((expiry - dt.datetime.now(dt.UTC)).total_seconds() + 0.5)


def _expiry_metric(server: NodeServer, identity: str) -> float:
    for family in text_string_to_metric_families(generate_latest(server.registry).decode()):
        for sample in family.samples:
            if sample.name == "federation_certificate_expiry_timestamp_seconds" and \
                    sample.labels == {"kind": "leaf", "identity": identity}:
                return float(sample.value)
    raise AssertionError(f"no expiry metric for {identity}")


async def test_a_node_serves_its_renewed_certificate_without_dropping_calls(
        pki: TestPKI) -> None:
    files = pki.ca.issue("inference", "renewing", validity=LIFETIME)
    old = leaf_certificate(files.cert)
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend(token_delay=0.15)])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=files, metrics_port=None)
    await server.start()
    target = f"localhost:{server.port}"
    admin = pki.identity("admin")
    try:
        assert _expiry_metric(server, files.identity.spiffe_id) == \
            old.not_valid_after_utc.timestamp()
        async with secure_channel(target, admin, GrpcConfig()) as before:
            stream = inference_pb2_grpc.InferenceServiceStub(before).Generate(_request())
            assert (await stream.read()).HasField("delta")  # type: ignore[union-attr]
            renewed = renew_identities(pki.ca, dt.timedelta(days=1))
            assert [f.identity for f in renewed] == [files.identity]  # only the short one
            await _sleep_past(old.not_valid_after_utc)
            # A new connection after the old certificate expired: the handshake works
            # only because the node now serves the renewed one.
            async with secure_channel(target, admin, GrpcConfig()) as after:
                listed = await inference_pb2_grpc.InferenceServiceStub(after).ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5)
            assert [m.id for m in listed.models] == ["test-model"]
            # The call in flight since before the renewal ran to its end.
            # (read() to the end: a call is read one way, and read() started it.)
            rest = []
            while (response := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined, union-attr]
                rest.append(response)
            assert rest[-1].HasField("finished")
            assert sum(r.delta.tokens for r in rest[:-1]) == WORDS - 1
        assert server.credentials[0].reloads == 1
        new = leaf_certificate(files.cert)
        assert new.serial_number != old.serial_number
        assert _expiry_metric(server, files.identity.spiffe_id) == \
            new.not_valid_after_utc.timestamp()
    finally:
        await server.stop(0)


async def test_a_client_channel_presents_its_renewed_certificate(pki: TestPKI) -> None:
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend()])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=pki.identity("inference"), metrics_port=None)
    await server.start()
    client = pki.ca.issue("gateway", "renewing", validity=LIFETIME)
    expiry = leaf_certificate(client.cert).not_valid_after_utc
    try:
        async with secure_channel(f"localhost:{server.port}", client, GrpcConfig()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            renew_identities(pki.ca, dt.timedelta(days=1))
            await _sleep_past(expiry)
            # The same stub and channel object: the interceptor checks the presented
            # certificate's expiry on every call, so this passes only with the new one.
            for _ in range(3):
                await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            assert channel.renewals == 1  # type: ignore[attr-defined]
    finally:
        await server.stop(0)


async def test_an_expired_client_certificate_without_renewal_is_refused(
        pki: TestPKI) -> None:
    """The control for the test above: the same wait without a renewal fails."""
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend()])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=pki.identity("inference"), metrics_port=None)
    await server.start()
    client = pki.ca.issue("gateway", "lapsing", validity=LIFETIME)
    try:
        async with secure_channel(f"localhost:{server.port}", client, GrpcConfig()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            await _sleep_past(leaf_certificate(client.cert).not_valid_after_utc)
            try:
                await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("an expired client certificate was accepted")
    finally:
        await server.stop(0)


async def test_long_lived_streams_move_to_the_renewed_certificate(pki: TestPKI) -> None:
    """The router's generation stream was opened with the old certificate, and a stream
    keeps it: the node re-checks it at every start, so past its expiry generations on
    that stream would be refused. After a renewal the router opens a new stream with the
    new certificate (and retires the old one)."""
    from federation.inference.client import InferenceRouter
    from federation.inference.types import ChatMessage, GenerationFinished, GenerationRequest

    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend()])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=pki.identity("inference"), metrics_port=None)
    await server.start()
    client = pki.ca.issue("gateway", "streaming", validity=LIFETIME)
    router = InferenceRouter([f"localhost:{server.port}"], client, GrpcConfig(),
                             refresh_seconds=60)
    await router.start()

    async def generate(text: str) -> GenerationFinished:
        events = [e async for e in router.generate(GenerationRequest(
            "test-model", (ChatMessage("user", text),)))]
        assert isinstance(events[-1], GenerationFinished)
        return events[-1]

    expiry = leaf_certificate(client.cert).not_valid_after_utc
    try:
        await generate("before the renewal")
        renew_identities(pki.ca, dt.timedelta(days=1))
        await _sleep_past(expiry)
        for n in range(3):
            assert (await generate(f"after {n}")).finish_reason == "stop"
        streams_handled = server.registry.get_sample_value(
            "federation_grpc_server_handled_total",
            {"grpc_service": "federation.v1.InferenceService",
             "grpc_method": "GenerateStream", "grpc_code": "OK"})
    finally:
        await router.stop()
        await server.stop(0)
    assert streams_handled == 1  # the old stream, retired and ended once idle


@pytest.mark.parametrize("valid_from", [dt.timedelta(hours=1), -dt.timedelta(hours=2)],
                         ids=["not-valid-yet", "expired"])
async def test_a_replacement_that_is_not_valid_now_is_not_taken(
        pki: TestPKI, valid_from: dt.timedelta) -> None:
    """A renewal issued on a host whose clock is an hour ahead is not valid yet here, and
    an old archive installed again holds expired certificates: the node used to serve
    such a replacement at once (every new handshake then failed, "certificate is not yet
    valid") and a client to present it. Both keep the certificate in use instead."""
    server_files = pki.ca.issue("inference", "replaced")
    client_files = pki.ca.issue("gateway", "replaced")
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend()])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=server_files, metrics_port=None)
    await server.start()
    start = dt.datetime.now(dt.UTC) + valid_from
    try:
        async with secure_channel(f"localhost:{server.port}", client_files,
                                  GrpcConfig()) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            nodes_ca = pki.ca.issuer(NODES)
            mint(nodes_ca, server_files.identity, pki.home, server=True, dns=("localhost",),
                 ips=("127.0.0.1",), valid_from=start)
            mint(nodes_ca, client_files.identity, pki.home, valid_from=start)
            await asyncio.sleep(CHECK_INTERVAL_SECONDS + 0.2)  # the channel looks again
            # A new handshake with the node, and calls on the client's channel.
            async with secure_channel(f"localhost:{server.port}", pki.identity("admin"),
                                      GrpcConfig()) as fresh:
                await inference_pb2_grpc.InferenceServiceStub(fresh).ListModels(
                    inference_pb2.ListModelsRequest(), timeout=5)
            for _ in range(3):
                await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
            assert channel.renewals == 0  # type: ignore[attr-defined]
        assert server.credentials[0].reloads == 0
    finally:
        await server.stop(0)


def test_a_renewal_that_fails_half_way_leaves_a_matching_pair(pki: TestPKI) -> None:
    """``pki renew`` renamed the new key into place before writing the certificate: when
    that write failed (a full disk; here its staging file cannot be created), the old
    certificate stayed beside a new key, and the node could not start again."""
    files = pki.ca.issue("inference", "halfway")
    before = CertificateWatch(files).load()
    files.cert.with_name(files.cert.name + ".tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        renew_identities(pki.ca, dt.timedelta(days=3650))
    assert CertificateWatch(files).load() == before  # the old pair, whole
    assert not files.key.with_name(files.key.name + ".tmp").exists()


async def test_closing_a_renewed_channel_ends_the_streams_it_opened_before(
        pki: TestPKI) -> None:
    """A stream opened before a renewal runs on the retired channel; closing the
    renewing channel must end it too, not leave it running for its whole length
    (40 tokens × 0.15 s here)."""
    server = NodeServer(
        [registration(InferenceServicer(BackendSet([TestBackend(token_delay=0.15)])))],
        trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(grace_seconds=0),
        listen="127.0.0.1:0", credentials=pki.identity("inference"), metrics_port=None)
    await server.start()
    client = pki.ca.issue("gateway", "closing", validity=dt.timedelta(days=1))
    try:
        channel = secure_channel(f"localhost:{server.port}", client, GrpcConfig())
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stream = stub.Generate(_request(), timeout=30)
        assert (await stream.read()) is not grpc.aio.EOF
        renew_identities(pki.ca, dt.timedelta(days=1))
        await asyncio.sleep(CHECK_INTERVAL_SECONDS + 0.1)
        await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
        assert channel.renewals == 1  # type: ignore[attr-defined]

        await asyncio.wait_for(channel.close(), timeout=5)
        # grpc.aio reports a call its own channel cancelled as CancelledError; had the
        # old channel stayed open, the stream would still be running: TimeoutError.
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(_drain(stream), timeout=2)
        assert await stream.code() == grpc.StatusCode.CANCELLED
    finally:
        await server.stop(0)


async def _drain(stream: grpc.aio.UnaryStreamCall) -> None:
    while (await stream.read()) is not grpc.aio.EOF:
        pass
