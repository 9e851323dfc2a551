"""The federation's certificate authority as a home holds it: init, load, issue.

:meth:`CertificateAuthority.init` creates the root and both intermediates. Loading a
home's CA needs only the intermediates' keys that are present: the CA host has both,
a broker host only the edge one (see :func:`load_edge_issuer`), and no host needs the
root key except to renew an intermediate. Every certificate issued here is appended
to ``pki/issued.jsonl`` (serial, identity, issuer, expiry).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from federation.config import PkiConfig
from federation.pki.chain import identity_of_certificate
from federation.pki.files import (
    EDGE,
    NODES,
    CertificateFiles,
    PKIPaths,
    cert_pem,
    issuer_kind,
    key_pem,
    leaf_certificate,
    load_private_key,
    write_file,
    write_files,
    write_private_file,
)
from federation.pki.identity import (
    Identity,
    NoIssuerKey,
    PKIError,
    validate_name,
    validate_role,
)
from federation.pki.issuer import Issuer, build_intermediate, build_root

DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


class CertificateAuthority:
    """A home's CA: the root certificate and whichever intermediates it holds keys for."""

    def __init__(self, paths: PKIPaths, trust_domain: str,
                 config: PkiConfig | None = None) -> None:
        self.paths = paths
        self.trust_domain = trust_domain
        self.config = config or PkiConfig()
        paths.check_layout()
        try:
            self._root = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        except FileNotFoundError as exc:
            raise PKIError(
                f"no federation CA under {paths.directory}; run `federation pki init`"
            ) from exc
        self._issuers = {kind: issuer for kind in (NODES, EDGE)
                         if (issuer := _load_issuer(paths, kind, trust_domain)) is not None}

    @property
    def certificate(self) -> x509.Certificate:
        """The root certificate: the trust anchor handed to devices and peers."""
        return self._root

    def edge_signer(self) -> EdgeSigner:
        return EdgeSigner(self.issuer(EDGE), self._root)

    def issuer(self, kind: str) -> Issuer:
        if kind not in self._issuers:
            raise NoIssuerKey(
                f"this home holds no key for the {kind} CA ({self.paths.intermediate_key(kind)}); "
                "issue such certificates on the CA host")
        return self._issuers[kind]

    @classmethod
    def init(cls, home: Path, trust_domain: str, *, force: bool = False,
             config: PkiConfig | None = None) -> CertificateAuthority:
        """Create a root and both intermediates under ``home`` (refuses to overwrite a CA
        unless ``force``)."""
        config = config or PkiConfig()
        paths = PKIPaths(home)
        if paths.ca_cert.exists() and not force:
            raise PKIError(f"a federation CA already exists at {paths.ca_cert}")
        root_key, root = build_root(trust_domain, dt.timedelta(days=config.root_validity_days))
        paths.directory.mkdir(parents=True, exist_ok=True)
        write_private_file(paths.ca_key, key_pem(root_key))
        write_file(paths.ca_cert, cert_pem(root))
        for kind in (NODES, EDGE):
            _write_intermediate(paths, kind, trust_domain, root_key, root, config)
        return cls(paths, trust_domain, config)

    def renew_intermediate(self, kind: str, root_key_file: Path) -> x509.Certificate:
        """A new certificate for intermediate ``kind`` over its *same* key, signed with the
        root key in ``root_key_file`` (brought back from offline for this). Keeping the key
        keeps its key identifier, so the leaves it signed stay valid and every verifier's
        :class:`~federation.pki.chain.ChainPolicy` still recognises them."""
        root_key = load_private_key(root_key_file)
        if root_key.public_key() != self._root.public_key():
            raise PKIError(f"{root_key_file} is not the key of {self.paths.ca_cert}")
        issuer = self.issuer(kind)
        cert = build_intermediate(kind, self.trust_domain, root_key, self._root,
                                  dt.timedelta(days=self.config.intermediate_validity_days),
                                  key=issuer.key)[1]
        write_file(self.paths.intermediate_cert(kind), cert_pem(cert))
        self._issuers[kind] = Issuer(kind, self.trust_domain, cert, issuer.key)
        return cert

    def issue(
        self,
        role: str,
        name: str,
        *,
        dns_names: tuple[str, ...] = DEFAULT_DNS,
        ip_addresses: tuple[str, ...] = DEFAULT_IPS,
        validity: dt.timedelta | None = None,
        into: PKIPaths | None = None,
    ) -> CertificateFiles:
        """Issue a key pair and a leaf certificate (with its intermediate), written under
        this home's PKI directory, or under ``into`` (a bundle being assembled)."""
        identity = Identity(self.trust_domain, validate_name(name), validate_role(role))
        if identity.is_edge:
            dns_names, ip_addresses = (), ()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(identity, key.public_key(), dns_names, ip_addresses, validity)
        target = into or self.paths
        cert_path, key_path = target.leaf_cert(role, name), target.leaf_key(role, name)
        # Both staged before either replaces the old one (key first): a renewal that fails
        # half-way must not leave the old certificate beside a new key.
        write_files([(key_path, key_pem(key), 0o600),
                     (cert_path, cert_pem(cert, self.issuer(issuer_kind(role)).certificate),
                      0o644)])
        return CertificateFiles(identity, cert_path, key_path, target.ca_cert)

    def sign(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        validity: dt.timedelta | None = None,
    ) -> x509.Certificate:
        """Sign a leaf for ``identity`` with the intermediate of its kind, and log it."""
        issuer = self.issuer(issuer_kind(identity.role))
        validity = validity or dt.timedelta(days=self.config.leaf_validity_days)
        cert = issuer.sign(identity, public_key, dns_names, ip_addresses, validity)
        log_issuance(self.paths, identity, issuer.kind, cert)
        return cert


def _write_intermediate(paths: PKIPaths, kind: str, trust_domain: str,
                        root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate,
                        config: PkiConfig) -> x509.Certificate:
    key, cert = build_intermediate(kind, trust_domain, root_key, root,
                                   dt.timedelta(days=config.intermediate_validity_days))
    write_private_file(paths.intermediate_key(kind), key_pem(key))
    write_file(paths.intermediate_cert(kind), cert_pem(cert))
    return cert


def _load_issuer(paths: PKIPaths, kind: str, trust_domain: str) -> Issuer | None:
    key_file, cert_file = paths.intermediate_key(kind), paths.intermediate_cert(kind)
    if not key_file.exists() or not cert_file.exists():
        return None
    return Issuer(kind, trust_domain, leaf_certificate(cert_file), load_private_key(key_file))


def load_ca(home: Path, trust_domain: str, config: PkiConfig | None = None
            ) -> CertificateAuthority:
    return CertificateAuthority(PKIPaths(home), trust_domain, config)


@dataclass(frozen=True)
class EdgeSigner:
    """What the broker signs device certificates with: the edge intermediate alone (it
    cannot sign a node or admin identity), and the root to hand to devices."""

    issuer: Issuer
    root: x509.Certificate


def load_edge_signer(home: Path, trust_domain: str) -> EdgeSigner:
    """The broker's signer; the nodes CA's key is never loaded into the broker."""
    paths = PKIPaths(home)
    paths.check_layout()
    issuer = _load_issuer(paths, EDGE, trust_domain)
    if issuer is None:
        raise PKIError(f"no edge CA key at {paths.intermediate_key(EDGE)}")
    return EdgeSigner(issuer, x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))


def log_issuance(paths: PKIPaths, identity: Identity, kind: str,
                 cert: x509.Certificate) -> None:
    """Append the certificate to ``issued.jsonl``: what a deny list by serial, an audit of
    what was issued, or a renewal reminder reads."""
    line = json.dumps({
        "serial": format(cert.serial_number, "x"),
        "identity": identity.spiffe_id,
        "issuer": kind,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }, sort_keys=True)
    paths.directory.mkdir(parents=True, exist_ok=True)
    with paths.issuance_log.open("a") as log:
        log.write(line + "\n")


def needs_renewal(cert_file: Path, within: dt.timedelta) -> bool:
    """True when the certificate expires within ``within`` (or is unreadable)."""
    try:
        cert = leaf_certificate(cert_file)
    except (OSError, ValueError):
        return True
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= within


def ensure_identity(ca: CertificateAuthority, role: str, name: str) -> CertificateFiles:
    """The identity's files, issued first if missing or close to expiry."""
    paths = ca.paths
    cert, key = paths.leaf_cert(role, name), paths.leaf_key(role, name)
    within = dt.timedelta(days=ca.config.renew_within_days)
    if cert.exists() and key.exists() and not needs_renewal(cert, within):
        return CertificateFiles(Identity(ca.trust_domain, name, role), cert, key, paths.ca_cert)
    return ca.issue(role, name)


def renew_identities(ca: CertificateAuthority, within: dt.timedelta) -> list[CertificateFiles]:
    """Reissue, in place, every identity of this home expiring within ``within`` (same
    role, name and host names; a new key). The key is renamed into place before the
    certificate, and a running node serves the new pair from its next handshake."""
    renewed: list[CertificateFiles] = []
    for cert_file in sorted((ca.paths.directory / "issued").glob("*.pem")):
        if not needs_renewal(cert_file, within):
            continue
        identity, dns, ips = _identity_of(leaf_certificate(cert_file), ca.trust_domain)
        if identity is None or not ca.paths.leaf_key(identity.role, identity.name).exists():
            continue
        renewed.append(ca.issue(identity.role, identity.name, dns_names=dns, ip_addresses=ips))
    return renewed


def migrate_legacy(home: Path, trust_domain: str, config: PkiConfig | None = None
                   ) -> tuple[Path, list[Identity]]:
    """Replace a single-CA PKI with a root and intermediates; reissue its identities.

    The old directory is kept beside the new one (``pki.legacy-<time>``). Returns it
    and the identities issued again (same role, name and host names)."""
    paths = PKIPaths(home)
    if not paths.ca_cert.exists():
        raise PKIError(f"no PKI under {paths.directory} to migrate")
    if paths.intermediate_cert(NODES).exists():
        raise PKIError(f"{paths.directory} already has intermediate CAs; nothing to migrate")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    legacy = paths.directory.with_name(f"pki.legacy-{stamp}")
    shutil.move(paths.directory, legacy)
    ca = CertificateAuthority.init(home, trust_domain, config=config)
    reissued: list[Identity] = []
    for old in sorted((legacy / "issued").glob("*.pem")):
        identity, dns, ips = _identity_of(leaf_certificate(old), trust_domain)
        if identity is None:
            continue
        ca.issue(identity.role, identity.name, dns_names=dns, ip_addresses=ips)
        reissued.append(identity)
    return legacy, reissued


def _identity_of(cert: x509.Certificate, trust_domain: str
                 ) -> tuple[Identity | None, tuple[str, ...], tuple[str, ...]]:
    try:
        identity = identity_of_certificate(cert, trust_domain)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (PKIError, x509.ExtensionNotFound):
        return None, (), ()
    dns = tuple(sans.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
    return identity, dns, ips
