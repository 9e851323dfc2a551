"""The three certificate authorities and what each may sign.

* The **root** (``ca.pem``) signs only the two intermediates (path length 1). Its key
  is needed again only to renew an intermediate, so it can be kept offline.
* The **nodes** intermediate signs node, gateway and admin identities (path length 0).
* The **edge** intermediate is the broker's, for enrolling devices (path length 0). Its
  name constraints limit what a stolen key could mint, and every TLS verifier of the
  federation (grpc's BoringSSL, OpenSSL) enforces them: URIs only in the trust domain,
  a subject only under ``O=Federation, OU=edge``, no DNS name and no IP address. Its
  extended key usage is client authentication only, so nothing it signs can serve TLS.

X.509 URI name constraints match the URI's *host* only (RFC 5280 4.2.1.10), so the
``/edge/`` path cannot be written into them: a constraint carrying a path makes
BoringSSL refuse every certificate below it ("unsupported or invalid name constraint
syntax"). That last step, "an identity signed by the edge intermediate is an edge
identity", is checked by :class:`federation.pki.chain.ChainPolicy` on every call,
from the leaf's authority key identifier.

Serial numbers are random 159-bit values, unique per certificate and recorded in the
issuance log, so a deny list by serial can be checked without changing the chain.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.pki.files import EDGE, NODES, issuer_kind
from federation.pki.identity import Identity, PKIError

ORGANIZATION = "Federation"
_CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long in the past, so a peer whose clock is a little behind
still accepts a certificate issued a moment ago."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False,
    )


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def build_root(trust_domain: str, validity: dt.timedelta
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Federation root CA ({trust_domain})")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def edge_name_constraints(trust_domain: str) -> x509.NameConstraints:
    """What the edge intermediate may name: URIs of the trust domain (host part, the
    only part X.509 constrains), subjects under ``O=Federation, OU=edge``; never a DNS
    name or an IP address (so never a server a node would connect to)."""
    return x509.NameConstraints(
        permitted_subtrees=[
            x509.UniformResourceIdentifier(trust_domain),
            x509.DirectoryName(_name_prefix(EDGE)),
        ],
        excluded_subtrees=[
            x509.DNSName(""),
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


def _name_prefix(unit: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
    ])


def build_intermediate(
    kind: str, trust_domain: str, root_key: ec.EllipticCurvePrivateKey,
    root: x509.Certificate, validity: dt.timedelta,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An intermediate of ``kind`` (``nodes`` or ``edge``) signed by the root, over ``key``
    (a new one by default)."""
    if kind not in (NODES, EDGE):
        raise PKIError(f"unknown intermediate {kind!r}")
    _ensure_in_force(root, "the root CA", "federation pki init --force (a new CA), then "
                     "every identity again")
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"Federation {kind} CA ({trust_domain})", f"{kind}-ca"))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + validity, root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False)
    )
    if kind == EDGE:
        builder = builder.add_extension(edge_name_constraints(trust_domain), critical=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return key, builder.sign(root_key, hashes.SHA256())


def _ensure_in_force(ca: x509.Certificate, name: str, remedy: str) -> None:
    """What a CA signs lives no longer than the CA's own certificate: once that has
    expired, nothing it signs can be valid, so it signs nothing, and says what to do."""
    expiry = ca.not_valid_after_utc
    if _now() >= expiry:
        raise PKIError(f"{name}'s certificate expired at {expiry:%Y-%m-%d %H:%M:%S} UTC, so "
                       f"nothing it signed would be valid: {remedy}")


def key_identifier(certificate: x509.Certificate) -> bytes:
    """The subject key identifier of a CA certificate."""
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(
            certificate.public_key()).digest  # type: ignore[arg-type]


@dataclass(frozen=True)
class Issuer:
    """One intermediate with its key: signs leaves of its own kind and nothing else."""

    kind: str
    trust_domain: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def sign(
        self,
        identity: Identity,
        public_key: ec.EllipticCurvePublicKey,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        validity: dt.timedelta = dt.timedelta(days=30),
    ) -> x509.Certificate:
        """A leaf certificate for ``identity`` over ``public_key``.

        Refuses an identity of the other intermediate's kind (the edge CA signs edge
        identities only) and, for edge identities, any DNS or IP name."""
        if issuer_kind(identity.role) != self.kind:
            raise PKIError(
                f"the {self.kind} CA may not sign {identity.spiffe_id} "
                f"(a {issuer_kind(identity.role)} identity)")
        if identity.trust_domain != self.trust_domain:
            raise PKIError(f"{identity.spiffe_id} is not in trust domain {self.trust_domain}")
        if self.kind == EDGE and (dns_names or ip_addresses):
            raise PKIError("edge certificates carry no DNS name or IP address")
        _ensure_in_force(self.certificate, f"the {self.kind} CA",
                         f"federation pki renew --intermediate {self.kind} --root-key FILE")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
        sans += [x509.DNSName(d) for d in dict.fromkeys(dns_names)]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ip_addresses)]
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(_name(identity.name, identity.role))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(min(now + validity, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    if self.kind == NODES else [ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False)
            .sign(self.key, hashes.SHA256())
        )
