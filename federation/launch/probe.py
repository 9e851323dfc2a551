"""Every node of a deployment, as the operator sees it from the peers configuration:
health (``grpc.health.v1``), version (the ``x-federation-version`` the node sends with
every health answer), certificate expiry and identity (read from a TLS handshake with
the operator's certificate: grpc's Python client does not show the server's
certificate), and address. Used by ``federation status`` across hosts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from dataclasses import dataclass

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.config import ROLES_WITH_SERVICES, Settings
from federation.interceptor import VERSION_HEADER
from federation.pki import CertificateFiles, PKIError, identity_of_certificate


@dataclass
class NodeProbe:
    role: str
    address: str
    health: str
    """``serving``, ``not_serving`` or ``unreachable``."""
    version: str = ""
    certificate_expires: dt.datetime | None = None
    identity: str = ""
    problem: str = ""


def peer_targets(settings: Settings) -> list[tuple[str, str]]:
    """``(role, host:port)`` of every node the peers configuration names."""
    return [(role, address) for role in ROLES_WITH_SERVICES
            for address in settings.peers.addresses(role)]


async def probe_node(role: str, address: str, admin: CertificateFiles, settings: Settings,
                     seconds: float) -> NodeProbe:
    probe = NodeProbe(role, address, "unreachable")
    try:
        cert = await asyncio.to_thread(_server_certificate, address, admin, seconds)
    except (OSError, ssl.SSLError) as exc:
        probe.problem = f"TLS: {exc}"
        return probe
    probe.certificate_expires = cert.not_valid_after_utc
    try:
        probe.identity = identity_of_certificate(cert, settings.trust_domain).spiffe_id
    except PKIError as exc:
        probe.problem = str(exc)
    async with secure_channel(address, admin, settings.grpc) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=seconds)
        try:
            reply = await call
            metadata = await call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            probe.health = ("unreachable" if exc.code() in (
                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else "not_serving")
            probe.problem = probe.problem or f"{exc.code().name}: {exc.details()}"
            return probe
    probe.version = str(dict(metadata or ()).get(VERSION_HEADER, ""))
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    probe.health = "serving" if serving else "not_serving"
    return probe


def _server_certificate(address: str, admin: CertificateFiles, seconds: float
                        ) -> x509.Certificate:
    """The node's certificate, with its host name checked as a gRPC client would."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(admin.ca_cert))
    context.load_cert_chain(str(admin.cert), str(admin.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=seconds) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError("the node sent no certificate")
    return x509.load_der_x509_certificate(der)


async def probe_peers(settings: Settings, admin: CertificateFiles) -> list[NodeProbe]:
    seconds = settings.gateway.health_timeout_seconds
    return list(await asyncio.gather(*(probe_node(role, address, admin, settings, seconds)
                                       for role, address in peer_targets(settings))))
