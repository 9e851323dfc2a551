"""The root, the two intermediates, and what each verifier accepts from each.

A thief of the broker host gets the edge intermediate's key. Whatever it mints for a
node or admin identity must be refused everywhere: by TLS when the name constraints
catch it (a subject outside ``OU=edge``, a DNS name, a server certificate), by the
interceptor's identity-to-issuer rule when only the SPIFFE path differs, on a node's
port and on the broker's enrollment port alike.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.config import GrpcConfig
from federation.pki import (
    EDGE,
    NODES,
    CertificateAuthority,
    CertificateFiles,
    Identity,
    PKIError,
    PKIPaths,
    leaf_certificate,
    load_ca,
    load_edge_signer,
    migrate_legacy,
)
from federation.pki.files import cert_pem, load_private_key, write_file
from federation.server import NodeServer
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc, key_authority_pb2, key_authority_pb2_grpc
from tests.edge_support import BrokerNode
from tests.pki_support import mint
from tests.support import TRUST_DOMAIN, TestPKI, serving

ADMIN = Identity(TRUST_DOMAIN, "mallory", "admin")


@pytest.fixture
async def node(pki: TestPKI) -> NodeServer:
    async with serving(pki, [], role="keys") as server:
        yield server  # type: ignore[misc]


async def _health(target: str, files: CertificateFiles) -> None:
    async with secure_channel(target, files, GrpcConfig()) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)


async def _refused(target: str, files: CertificateFiles) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _health(target, files)
    return info.value


def test_root_signs_two_intermediates_with_path_length_zero(pki: TestPKI) -> None:
    paths = pki.ca.paths
    root = leaf_certificate(paths.ca_cert)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    for kind in (NODES, EDGE):
        cert = leaf_certificate(paths.intermediate_cert(kind))
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca and constraints.path_length == 0
        cert.verify_directly_issued_by(root)
    edge = leaf_certificate(paths.intermediate_cert(EDGE))
    names = edge.extensions.get_extension_for_class(x509.NameConstraints)
    assert names.critical
    permitted = names.value.permitted_subtrees or []
    assert x509.UniformResourceIdentifier(TRUST_DOMAIN) in permitted
    assert x509.DNSName("") in (names.value.excluded_subtrees or [])
    # A node's certificate is sent with its intermediate, and chains to the root.
    chain = x509.load_pem_x509_certificates(pki.identity("keys").cert.read_bytes())
    assert len(chain) == 2 and chain[1] == leaf_certificate(paths.intermediate_cert(NODES))


def test_the_edge_ca_signs_only_edge_identities(pki: TestPKI) -> None:
    signer = pki.ca.edge_signer()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(PKIError, match="edge CA may not sign"):
        signer.issuer.sign(ADMIN, key)
    with pytest.raises(PKIError, match="no DNS name"):
        signer.issuer.sign(Identity(TRUST_DOMAIN, "phone", "edge"), key, ("phone.lan",))
    assert pki.ca.issuer(NODES).sign(ADMIN, key) is not None
    with pytest.raises(PKIError, match="nodes CA may not sign"):
        pki.ca.issuer(NODES).sign(Identity(TRUST_DOMAIN, "phone", "edge"), key)


def test_the_broker_loads_the_edge_key_alone(pki: TestPKI, home: Path) -> None:
    signer = load_edge_signer(home, TRUST_DOMAIN)
    assert signer.issuer.kind == EDGE
    # Without the nodes CA's key (a broker host's home), nodes cannot be issued at all.
    PKIPaths(home).intermediate_key(NODES).unlink()
    with pytest.raises(PKIError, match="no key for the nodes CA"):
        load_ca(home, TRUST_DOMAIN).issue("admin", "x")


async def test_edge_minted_admin_with_edge_subject_is_refused_by_the_interceptor(
        pki: TestPKI, node: NodeServer, tmp_path: Path) -> None:
    """Passes TLS (OU=edge, no DNS name: within the name constraints); the URI path is
    a node's, which only the nodes CA may sign."""
    forged = mint(pki.ca.edge_signer().issuer, ADMIN, pki.home, unit="edge")
    error = await _refused(f"127.0.0.1:{node.port}", forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signed by the edge CA" in (error.details() or "")


async def test_edge_minted_admin_with_admin_subject_is_refused_by_tls(
        pki: TestPKI, node: NodeServer) -> None:
    forged = mint(pki.ca.edge_signer().issuer, ADMIN, pki.home)  # OU=admin
    assert (await _refused(f"127.0.0.1:{node.port}", forged)).code() == \
        grpc.StatusCode.UNAVAILABLE  # the handshake fails: permitted subtree violation


async def test_edge_minted_certificate_with_a_dns_name_is_refused_by_tls(
        pki: TestPKI, node: NodeServer) -> None:
    forged = mint(pki.ca.edge_signer().issuer, Identity(TRUST_DOMAIN, "p", "edge"), pki.home,
                  dns=("localhost",))
    assert (await _refused(f"127.0.0.1:{node.port}", forged)).code() == \
        grpc.StatusCode.UNAVAILABLE


async def test_an_edge_identity_from_the_nodes_ca_is_refused(
        pki: TestPKI, node: NodeServer) -> None:
    forged = mint(pki.ca.issuer(NODES), Identity(TRUST_DOMAIN, "phone", "edge"), pki.home)
    error = await _refused(f"127.0.0.1:{node.port}", forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "only the edge CA may sign edge identities" in (error.details() or "")


async def test_a_server_certificate_from_the_edge_ca_is_refused_by_clients(
        pki: TestPKI) -> None:
    """The broker's key cannot impersonate a node to the gateway: its certificates are
    for client authentication only (and name no host)."""
    impostor = mint(pki.ca.edge_signer().issuer, Identity(TRUST_DOMAIN, "keys", "edge"),
                    pki.home, unit="edge", server=True)
    server = NodeServer([], trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(),
                        listen="127.0.0.1:0", credentials=impostor, metrics_port=None)
    await server.start()
    try:
        error = await _refused(f"127.0.0.1:{server.port}", pki.identity("admin"))
    finally:
        await server.stop(0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_edge_minted_admin_is_refused_on_the_enrollment_port(
        pki: TestPKI, broker_node: BrokerNode) -> None:
    """The port that takes callers without a certificate does not even ask for one: the
    forged admin reaches nothing there but Enroll (which needs a token), neither a
    renewal nor an operator's method; on the main port the interceptor refuses it."""
    server, _ = broker_node
    forged = mint(pki.ca.edge_signer().issuer, ADMIN, pki.home, unit="edge")
    target = f"localhost:{server.enrollment_port}"
    async with secure_channel(target, forged, GrpcConfig()) as channel:
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        for call in (stub.RenewCertificate(pb.RenewCertificateRequest(csr_der=b"x"), timeout=5),
                     stub.ListJobs(pb.ListJobsRequest(tenant_id="t"), timeout=5)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "requires a client certificate" in (info.value.details() or "")
    # The same forged identity on the broker's main port: refused the same way.
    error = await _refused(f"localhost:{server.port}", forged)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signed by the edge CA" in (error.details() or "")


async def test_a_node_certificate_naming_another_host_is_refused(pki: TestPKI) -> None:
    """Clients verify the server's host name: a node presenting a certificate issued
    for another host is refused even though the CA is right."""
    other = pki.ca.issue("keys", "other-host", dns_names=("other-host",), ip_addresses=())
    server = NodeServer([], trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(),
                        listen="127.0.0.1:0", credentials=other, metrics_port=None)
    await server.start()
    try:
        error = await _refused(f"127.0.0.1:{server.port}", pki.identity("admin"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        async with secure_channel(f"localhost:{server.port}", pki.identity("admin"),
                                  GrpcConfig()) as channel:
            stub = key_authority_pb2_grpc.KeyAuthorityServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListKeys(key_authority_pb2.ListKeysRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


def test_a_single_ca_home_is_told_to_migrate(tmp_path: Path) -> None:
    home = tmp_path / "legacy"
    _legacy_home(home)
    with pytest.raises(PKIError, match="federation pki migrate"):
        load_ca(home, TRUST_DOMAIN)
    legacy, reissued = migrate_legacy(home, TRUST_DOMAIN)
    assert legacy.name.startswith("pki.legacy-")
    assert [i.spiffe_id for i in reissued] == [f"spiffe://{TRUST_DOMAIN}/node/local/keys"]
    ca = load_ca(home, TRUST_DOMAIN)
    cert = leaf_certificate(ca.paths.leaf_cert("keys", "local"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "keys.lan" in sans.get_values_for_type(x509.DNSName)  # host names carried over


def _legacy_home(home: Path) -> None:
    """What `federation pki init` + `issue` wrote before intermediates: one CA (path
    length 0) signing leaves directly."""
    ca = CertificateAuthority.init(home, TRUST_DOMAIN)
    nodes = ca.issuer(NODES)
    paths = ca.paths
    files = ca.issue("keys", "local", dns_names=("keys.lan",))
    # Make it look like the old layout: the nodes CA as the only CA, no intermediates.
    paths.ca_cert.write_bytes(paths.intermediate_cert(NODES).read_bytes())
    for kind in (NODES, EDGE):
        paths.intermediate_cert(kind).unlink()
        paths.intermediate_key(kind).unlink()
    assert files.cert.exists() and nodes is not None
    # An old leaf file held one certificate.
    files.cert.write_bytes(files.cert.read_bytes().split(b"-----END CERTIFICATE-----")[0]
                           + b"-----END CERTIFICATE-----\n")
    assert dt.datetime.now(dt.UTC) < leaf_certificate(files.cert).not_valid_after_utc


def test_an_expired_intermediate_is_reported_with_its_remedy(pki: TestPKI) -> None:
    """Leaves live no longer than their intermediate: once it had expired, `pki issue` and
    `pki renew` (and `federation up`'s renewal) ended in a traceback from the x509
    builder ("not valid after date must be after the not valid before date"). Now one
    line names the remedy, and the runbook's command brings issuance back."""
    pki.identity("keys")  # a leaf for `pki renew --all` to renew
    paths = pki.ca.paths
    root_key = load_private_key(paths.ca_key)
    current = leaf_certificate(paths.intermediate_cert(NODES))
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(current.subject)
               .issuer_name(current.issuer).public_key(current.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=400))
               .not_valid_after(now - dt.timedelta(days=1)))
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    write_file(paths.intermediate_cert(NODES),
               cert_pem(builder.sign(root_key, hashes.SHA256())))

    for command in (("issue", "--role", "keys", "--name", "k2"), ("renew", "--all")):
        done = _cli(pki.home, "pki", *command)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1
        assert "the nodes CA's certificate expired at" in done.stderr
        assert "federation pki renew --intermediate nodes --root-key FILE" in done.stderr
        assert "on a node host" not in done.stderr  # the hint for a home without CA keys
    renewed = _cli(pki.home, "pki", "renew", "--intermediate", "nodes", "--root-key",
                   str(paths.ca_key))
    assert renewed.returncode == 0, renewed.stderr
    issued = _cli(pki.home, "pki", "issue", "--role", "keys", "--name", "k2", "--json")
    assert issued.returncode == 0, issued.stderr


def test_renew_on_a_node_host_says_to_renew_its_bundle_on_the_ca_host(pki: TestPKI) -> None:
    pki.identity("keys")
    pki.ca.paths.intermediate_key(NODES).unlink()  # what a node host's home holds
    done = _cli(pki.home, "pki", "renew", "--all")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "holds no key for the nodes CA" in done.stderr
    assert "renew its bundle on the CA host" in done.stderr


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60, check=False)
