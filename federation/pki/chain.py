"""What every verifier checks beyond TLS: which intermediate signed which identity.

TLS (grpc's BoringSSL) verifies the chain up to the root, the edge intermediate's
name constraints and the validity dates. What X.509 cannot express is the SPIFFE
path: a certificate the edge intermediate signed, with ``OU=edge`` and no DNS name,
could still carry the URI ``spiffe://…/node/x/admin``. :class:`ChainPolicy` closes
that gap: the leaf's authority key identifier must be the intermediate of the
identity's kind (nodes for node, gateway and admin identities; edge for devices).
The interceptor applies it on every call; the broker applies it before renewing a
device's certificate.

A deny list by serial would be checked here too: the leaf (and so its serial) is at
hand, and nothing in the chain needs to change for it.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from federation.pki.files import EDGE, NODES, issuer_kind, leaf_certificate
from federation.pki.identity import Identity, PKIError, parse_spiffe_id
from federation.pki.issuer import key_identifier


def identity_of_certificate(cert: x509.Certificate, trust_domain: str) -> Identity:
    """The one SPIFFE identity a certificate names (refused unless exactly one URI SAN)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("the certificate has no subject alternative name") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PKIError(f"the certificate must carry exactly one URI SAN, has {len(uris)}")
    return parse_spiffe_id(uris[0], trust_domain)


@functools.lru_cache(maxsize=4096)
def _parsed(pem: bytes) -> x509.Certificate:
    # Cached: parsing costs tens of microseconds, and a peer presents the same
    # certificate on every call of its connection.
    return x509.load_pem_x509_certificate(pem)


def not_after(pem: bytes) -> dt.datetime:
    """When the (first) certificate in ``pem`` expires."""
    return _parsed(pem).not_valid_after_utc


def _authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return value.key_identifier


@dataclass(frozen=True)
class ChainPolicy:
    """The intermediates' key identifiers, and the rule that binds identity to issuer."""

    issuers: dict[str, bytes]
    """Subject key identifier of each intermediate, by kind (``nodes``, ``edge``)."""

    @classmethod
    def load(cls, pki_directory: Path) -> ChainPolicy:
        """From the intermediates' certificates (public; every host holds them)."""
        issuers: dict[str, bytes] = {}
        for kind in (NODES, EDGE):
            path = pki_directory / f"{kind}-ca.pem"
            if not path.exists():
                raise PKIError(f"{path} is missing: every host needs both intermediates' "
                               "certificates (they are in every host bundle)")
            issuers[kind] = key_identifier(leaf_certificate(path))
        return cls(issuers)

    def check(self, identity: Identity, leaf_pem: bytes) -> None:
        """Refuse ``identity`` unless the intermediate of its kind signed its certificate."""
        expected = issuer_kind(identity.role)
        signer = _authority_key_id(_parsed(leaf_pem))
        if signer == self.issuers[expected]:
            return
        actual = next((f"the {k} CA" for k, v in self.issuers.items() if v == signer),
                      "a CA that is not this federation's")
        raise PKIError(
            f"{identity.spiffe_id} was signed by {actual}; only the {expected} CA "
            f"may sign {'edge' if identity.is_edge else 'node and admin'} identities")
