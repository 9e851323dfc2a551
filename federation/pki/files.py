"""Where a federation home keeps its certificates, and how they are written.

Layout of ``$FEDERATION_HOME/pki`` (every host holds the public certificates; the
keys only where they are needed, see :mod:`federation.pki.bundle`):

========================  ==========================================================
``ca.pem``                the root certificate: the one trust anchor of every verifier
``ca.key``                the root key: only to sign intermediates; may live offline
``nodes-ca.pem|.key``     the intermediate that signs node, gateway and admin identities
``edge-ca.pem|.key``      the broker's intermediate: edge identities only (name constraints)
``issued/ROLE-NAME.pem``  a leaf certificate followed by its intermediate (the chain a peer sends)
``issued/ROLE-NAME.key``  its private key (0600)
``issued.jsonl``          one line per certificate issued here: serial, identity, expiry
========================  ==========================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.durable import write_all
from federation.pki.identity import Identity, PKIError

NODES, EDGE = "nodes", "edge"
"""The two intermediates: one for nodes, the gateway and operators; one for devices."""


def issuer_kind(role: str) -> str:
    """Which intermediate signs identities of ``role``."""
    return EDGE if role == "edge" else NODES


@dataclass(frozen=True)
class PKIPaths:
    """Where a federation home keeps its certificates."""

    home: Path

    @property
    def directory(self) -> Path:
        return self.home / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def intermediate_cert(self, kind: str) -> Path:
        return self.directory / f"{kind}-ca.pem"

    def intermediate_key(self, kind: str) -> Path:
        return self.directory / f"{kind}-ca.key"

    @property
    def issuance_log(self) -> Path:
        return self.directory / "issued.jsonl"

    def leaf_cert(self, role: str, name: str) -> Path:
        return self.directory / "issued" / f"{role}-{name}.pem"

    def leaf_key(self, role: str, name: str) -> Path:
        return self.directory / "issued" / f"{role}-{name}.key"

    def check_layout(self) -> None:
        """Refuse, with what to do, a home whose PKI predates the intermediate CAs."""
        if self.ca_cert.exists() and not self.intermediate_cert(NODES).exists():
            raise PKIError(
                f"{self.directory} holds a single-CA PKI from before intermediate CAs; run "
                "`federation pki migrate` to replace it with a root and two intermediates "
                "and reissue this home's identities (enrolled edge devices must enroll again)"
            )


@dataclass(frozen=True)
class CertificateFiles:
    """PEM paths of one issued identity, plus the root that anchors its chain."""

    identity: Identity
    cert: Path
    """The leaf certificate followed by the intermediate that signed it."""
    key: Path
    ca_cert: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return ``(key_pem, cert_chain_pem, ca_pem)``."""
        return self.key.read_bytes(), self.cert.read_bytes(), self.ca_cert.read_bytes()

    @property
    def pki_directory(self) -> Path:
        """The directory holding the root and the intermediates' certificates."""
        return self.ca_cert.parent


def certificate_files(home: Path, trust_domain: str, role: str, name: str) -> CertificateFiles:
    """The files of an identity that must already have been issued."""
    paths = PKIPaths(home)
    paths.check_layout()
    files = CertificateFiles(
        Identity(trust_domain, name, role),
        paths.leaf_cert(role, name),
        paths.leaf_key(role, name),
        paths.ca_cert,
    )
    for path in (files.cert, files.key, files.ca_cert):
        if not path.exists():
            raise PKIError(
                f"{path} is missing; issue it on the CA host (`federation pki bundle --host "
                f"{name} --roles {role}`) or run `federation pki issue --role {role} --name {name}`"
            )
    return files


def leaf_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file (the leaf of a chain file)."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created with mode 0600 (never readable by others), atomically."""
    write_file(path, data, 0o600)


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` beside ``path`` with ``mode``, fsync it, then rename it into place: a
    reader (a node reloading its certificate) sees the old file or the new one, never half."""
    write_files([(path, data, mode)])


def write_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Several files that belong together (a key and its certificate), in order: every one
    is written and fsynced beside its path first, and only then are they renamed into
    place. A write that fails (a full disk) replaces nothing, so a key is never left
    beside a certificate of another key; only a crash between two renames could."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.chmod(tmp, mode)
    return tmp


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} is not an ECDSA key")
    return key
