"""``federation pki bundle``: one archive per host, exactly what it needs, and a node
that runs from nothing else."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.config import GrpcConfig, Settings
from federation.credentials import CertificateWatch
from federation.pki import PKIError, certificate_files, leaf_certificate, load_ca
from federation.pki.bundle import (
    BundleSpec,
    build_bundle,
    install_bundle,
    recall_spec,
    remember_spec,
    write_bundle,
)
from federation.server import NodeServer
from tests.support import TRUST_DOMAIN, TestPKI

COMMON = {"bundle.json", "pki/ca.pem", "pki/nodes-ca.pem", "pki/edge-ca.pem"}


def _bundle(pki: TestPKI, tmp_path: Path, spec: BundleSpec) -> Path:
    out = tmp_path / f"{spec.host}.tar.gz"
    staging = tmp_path / f"staging-{spec.host}"
    staging.mkdir()
    bundle = build_bundle(pki.ca, Settings(home=pki.home), spec, staging)
    write_bundle(bundle, TRUST_DOMAIN, out)
    return out


def _members(archive: Path) -> dict[str, int]:
    with tarfile.open(archive) as tar:
        return {m.name: m.mode for m in tar.getmembers()}


@pytest.mark.parametrize(("roles", "extra"), [
    (("inference",), {"pki/issued/inference-h1.pem", "pki/issued/inference-h1.key"}),
    (("council", "broker"), {"pki/issued/council-h1.pem", "pki/issued/council-h1.key",
                             "pki/issued/broker-h1.pem", "pki/issued/broker-h1.key",
                             "pki/edge-ca.key"}),
    (("memory", "guardian"), {"pki/issued/memory-h1.pem", "pki/issued/memory-h1.key",
                              "pki/issued/guardian-h1.pem", "pki/issued/guardian-h1.key",
                              "guardian/checkpoint_signing.key",
                              "guardian/checkpoint_signing.key.pub"}),
    (("memory",), {"pki/issued/memory-h1.pem", "pki/issued/memory-h1.key",
                   "guardian/checkpoint_signing.key.pub"}),
    (("admin",), {"pki/issued/admin-operator.pem", "pki/issued/admin-operator.key"}),
])
def test_a_bundle_holds_exactly_what_its_roles_need(
        pki: TestPKI, tmp_path: Path, roles: tuple[str, ...], extra: set[str]) -> None:
    archive = _bundle(pki, tmp_path, BundleSpec("h1", roles, ("h1.lan",), ("10.0.0.7",)))
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    members = _members(archive)
    assert set(members) == COMMON | extra
    # Never the root's key nor the nodes CA's: no host but the CA host can mint nodes.
    assert "pki/ca.key" not in members and "pki/nodes-ca.key" not in members
    assert all(mode == 0o600 for name, mode in members.items() if name.endswith(".key"))


def test_the_guardian_and_memory_bundles_share_one_checkpoint_key(
        pki: TestPKI, tmp_path: Path) -> None:
    guardian = _bundle(pki, tmp_path, BundleSpec("g", ("guardian",)))
    memory = _bundle(pki, tmp_path, BundleSpec("m", ("memory",)))
    public = "guardian/checkpoint_signing.key.pub"
    with tarfile.open(guardian) as g, tarfile.open(memory) as m:
        assert g.extractfile(public).read() == m.extractfile(public).read()  # type: ignore[union-attr]


async def test_a_node_runs_from_its_installed_bundle_alone(
        pki: TestPKI, tmp_path: Path) -> None:
    spec = BundleSpec("inf1", ("inference",), ip_addresses=("127.0.0.1",))
    archive = _bundle(pki, tmp_path, spec)
    host_home = tmp_path / "inf1-home"
    install_bundle(archive, host_home, TRUST_DOMAIN)
    files = certificate_files(host_home, TRUST_DOMAIN, "inference", "inf1")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    server = NodeServer([], trust_domain=TRUST_DOMAIN, grpc_config=GrpcConfig(),
                        listen="127.0.0.1:0", credentials=files, metrics_port=None)
    await server.start()
    try:
        async with secure_channel(f"127.0.0.1:{server.port}", pki.identity("admin"),
                                  GrpcConfig()) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
    # The host holds no key that could issue anything.
    with pytest.raises(PKIError, match="no key for the nodes CA"):
        load_ca(host_home, TRUST_DOMAIN).issue("admin", "x")


def test_a_damaged_bundle_is_refused_before_anything_is_written(
        pki: TestPKI, tmp_path: Path) -> None:
    archive = _bundle(pki, tmp_path, BundleSpec("h2", ("keys",)))
    with tarfile.open(archive) as tar:
        entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    entries["pki/issued/keys-h2.pem"] = entries["pki/issued/keys-h2.pem"].replace(b"A", b"B", 1)
    forged = tmp_path / "forged.tar.gz"
    with tarfile.open(forged, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "target"
    with pytest.raises(PKIError, match="does not match its manifest"):
        install_bundle(forged, target, TRUST_DOMAIN)
    assert not target.exists()
    with pytest.raises(PKIError, match="trust domain"):
        install_bundle(archive, target, "other.example")


def test_renewing_a_host_bundle_reuses_its_spec(pki: TestPKI, tmp_path: Path) -> None:
    spec = BundleSpec("h3", ("gateway", "inference"), ("gw.lan",), ("10.0.0.9",))
    remember_spec(pki.ca.paths, spec)
    assert recall_spec(pki.ca.paths, "h3") == spec
    with pytest.raises(PKIError, match="no bundle was made for host nope"):
        recall_spec(pki.ca.paths, "nope")


def test_the_bundle_command_writes_a_private_archive(pki: TestPKI, tmp_path: Path) -> None:
    out = tmp_path / "db.tar.gz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    run = subprocess.run(
        [sys.executable, "-m", "federation.cli", "--home", str(pki.home), "pki", "bundle",
         "--host", "gw1", "--roles", "gateway", "--dns", "gw1.lan", "--ip", "10.9.0.2",
         "--out", str(out), "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["identities"][0]["identity"] == f"spiffe://{TRUST_DOMAIN}/node/gw1/gateway"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    host = tmp_path / "gw1-home"
    install_bundle(out, host, TRUST_DOMAIN)
    cert = leaf_certificate(host / "pki/issued/gateway-gw1.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names][1:] == ["gw1", "gw1.lan", "10.9.0.2"]
    again = subprocess.run(
        [sys.executable, "-m", "federation.cli", "--home", str(pki.home), "pki", "bundle",
         "--host", "gw1", "--roles", "gateway", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_an_install_that_fails_half_way_replaces_nothing(pki: TestPKI, tmp_path: Path) -> None:
    """Keys were renamed into place one by one before the certificates were written: a
    write failing in between (a full disk; here the certificate's staging file cannot be
    created) left the host with new keys beside old certificates, and a node restarted
    then could not load its identity. Now every file is staged before any is replaced."""
    host = tmp_path / "host"
    install_bundle(_bundle(pki, tmp_path, BundleSpec("h4", ("keys",))), host, TRUST_DOMAIN)
    files = certificate_files(host, TRUST_DOMAIN, "keys", "h4")
    before = CertificateWatch(files).load()
    renewed = tmp_path / "renewed"
    renewed.mkdir()
    archive = _bundle(pki, renewed, BundleSpec("h4", ("keys",)))
    files.cert.with_name(files.cert.name + ".tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        install_bundle(archive, host, TRUST_DOMAIN)
    assert CertificateWatch(files).load() == before  # the old pair, whole
    assert not files.key.with_name(files.key.name + ".tmp").exists()
