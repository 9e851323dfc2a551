"""Certificates no honest issuer would produce: what a thief of the edge CA's key (the
broker host's) could mint, to check that every verifier refuses it."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.pki import CertificateFiles, Identity, Issuer, PKIPaths
from federation.pki.files import cert_pem, key_pem, write_file, write_private_file


def mint(issuer: Issuer, identity: Identity, home: Path, *, unit: str | None = None,
         dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
         server: bool = False, valid_from: dt.datetime | None = None,
         lifetime: dt.timedelta = dt.timedelta(hours=1)) -> CertificateFiles:
    """A leaf for ``identity`` signed by ``issuer`` directly, bypassing ``Issuer.sign``'s
    rules; ``unit`` is the subject's OU (default: the identity's role). ``valid_from``
    (default: 5 minutes ago) and ``lifetime`` give what an issuer with a wrong clock, or
    an old archive, would."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH]
                                                  if server else [])
    start = valid_from or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Federation"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit or identity.role),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
        ]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.key.public_key()), False)
        .sign(issuer.key, hashes.SHA256())
    )
    paths = PKIPaths(home)
    write_private_file(paths.leaf_key(identity.role, identity.name), key_pem(key))
    write_file(paths.leaf_cert(identity.role, identity.name), cert_pem(cert, issuer.certificate))
    return CertificateFiles(identity, paths.leaf_cert(identity.role, identity.name),
                            paths.leaf_key(identity.role, identity.name), paths.ca_cert)
