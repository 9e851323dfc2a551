"""The federation's certificate authority and the identities it issues.

Every node, the gateway, operators and edge devices hold a leaf certificate
signed by the federation CA. A leaf's identity is exactly one SPIFFE-style URI
SAN, ``spiffe://<trust domain>/node/<name>/<role>`` (edge devices:
``spiffe://<trust domain>/edge/<name>``). Server certificates also carry DNS and
IP SANs because Python gRPC clients verify host names, not URI SANs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.config import ALL_ROLES

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
ADMIN_NAME = "operator"
"""Name of the admin identity ``federation up`` issues for the local operator."""
_NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class PKIError(Exception):
    """The PKI is missing, malformed, or asked for something it must not do."""


@dataclass(frozen=True, order=True)
class Identity:
    """Who a certificate says its holder is."""

    trust_domain: str
    name: str
    role: str

    @property
    def spiffe_id(self) -> str:
        if self.role == "edge":
            return f"spiffe://{self.trust_domain}/edge/{self.name}"
        return f"spiffe://{self.trust_domain}/node/{self.name}/{self.role}"

    def __str__(self) -> str:
        return self.spiffe_id


def parse_spiffe_id(uri: str, trust_domain: str) -> Identity:
    """Parse and validate a SPIFFE ID issued by this federation."""
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        raise PKIError(f"identity {uri!r} is not in trust domain {trust_domain!r}")
    parts = uri[len(prefix) :].split("/")
    if len(parts) == 3 and parts[0] == "node" and parts[2] in ALL_ROLES and parts[2] != "edge":
        return Identity(trust_domain, parts[1], parts[2])
    if len(parts) == 2 and parts[0] == "edge":
        return Identity(trust_domain, parts[1], "edge")
    raise PKIError(f"identity {uri!r} does not name a known role")


def validate_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise PKIError(
            f"invalid name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def validate_role(role: str) -> str:
    if role not in ALL_ROLES:
        raise PKIError(f"unknown role {role!r}; roles are: {', '.join(ALL_ROLES)}")
    return role


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

    def leaf_cert(self, role: str, name: str) -> Path:
        return self.directory / "issued" / f"{role}-{name}.pem"

    def leaf_key(self, role: str, name: str) -> Path:
        return self.directory / "issued" / f"{role}-{name}.key"


@dataclass(frozen=True)
class CertificateFiles:
    """PEM paths of one issued identity, plus the CA that signed it."""

    identity: Identity
    cert: Path
    key: Path
    ca_cert: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Return ``(key_pem, cert_pem, ca_pem)``."""
        return self.key.read_bytes(), self.cert.read_bytes(), self.ca_cert.read_bytes()


class CertificateAuthority:
    """A loaded federation CA that can sign leaf certificates."""

    def __init__(self, paths: PKIPaths, trust_domain: str) -> None:
        self.paths = paths
        self.trust_domain = trust_domain
        try:
            self._cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        except FileNotFoundError as exc:
            raise PKIError(
                f"no federation CA under {paths.directory}; run `federation pki init`"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{paths.ca_key} is not an ECDSA key")
        self._key = key

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @classmethod
    def init(cls, home: Path, trust_domain: str, *, force: bool = False) -> CertificateAuthority:
        """Create a new CA under ``home`` (refuses to overwrite one unless ``force``)."""
        paths = PKIPaths(home)
        if paths.ca_cert.exists() and not force:
            raise PKIError(f"a federation CA already exists at {paths.ca_cert}")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Federation"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Federation CA ({trust_domain})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        paths.directory.mkdir(parents=True, exist_ok=True)
        write_private_file(paths.ca_key, _key_pem(key))
        paths.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(paths, trust_domain)

    def issue(
        self,
        role: str,
        name: str,
        *,
        dns_names: tuple[str, ...] = ("localhost",),
        ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
        validity: dt.timedelta = LEAF_VALIDITY,
    ) -> CertificateFiles:
        """Issue a key pair and leaf certificate, written under the PKI directory."""
        identity = Identity(self.trust_domain, validate_name(name), validate_role(role))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(identity, key.public_key(), dns_names, ip_addresses, validity)
        cert_path = self.paths.leaf_cert(role, name)
        key_path = self.paths.leaf_key(role, name)
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return CertificateFiles(identity, cert_path, key_path, self.paths.ca_cert)

    def sign(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        validity: dt.timedelta = LEAF_VALIDITY,
    ) -> x509.Certificate:
        """Sign a leaf certificate for ``identity`` over ``public_key``."""
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Federation"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
                    ]
                )
            )
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(now + validity, self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )


def load_ca(home: Path, trust_domain: str) -> CertificateAuthority:
    return CertificateAuthority(PKIPaths(home), trust_domain)


def ensure_identity(ca: CertificateAuthority, role: str, name: str) -> CertificateFiles:
    """Return the identity's files, issuing them first if they do not exist yet."""
    paths = ca.paths
    cert, key = paths.leaf_cert(role, name), paths.leaf_key(role, name)
    if cert.exists() and key.exists():
        identity = Identity(ca.trust_domain, name, role)
        return CertificateFiles(identity, cert, key, paths.ca_cert)
    return ca.issue(role, name)


def certificate_files(home: Path, trust_domain: str, role: str, name: str) -> CertificateFiles:
    """The files of an identity that must already have been issued."""
    paths = PKIPaths(home)
    files = CertificateFiles(
        Identity(trust_domain, name, role),
        paths.leaf_cert(role, name),
        paths.leaf_key(role, name),
        paths.ca_cert,
    )
    for path in (files.cert, files.key, files.ca_cert):
        if not path.exists():
            raise PKIError(
                f"{path} is missing; run `federation pki issue --role {role} --name {name}`"
            )
    return files


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created with mode 0600 (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
