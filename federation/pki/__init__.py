"""The federation's certificate authority and the identities it issues.

A root CA (kept offline if wished) signs two intermediates: ``nodes`` for node,
gateway and admin identities, ``edge`` (the broker's, name-constrained) for devices.
A leaf's identity is exactly one SPIFFE-style URI SAN (:mod:`.identity`); server
certificates also carry DNS and IP SANs because Python gRPC clients verify host
names, not URI SANs. Modules: :mod:`.identity` (names), :mod:`.files` (the home's
layout), :mod:`.issuer` (the CAs and what each may sign), :mod:`.authority` (init,
issue, renew), :mod:`.chain` (the identity-to-issuer rule every verifier applies),
:mod:`.bundle` (one archive per host) and :mod:`.reload` (certificates that change
under a running process).
"""

from federation.pki.authority import (
    CertificateAuthority,
    EdgeSigner,
    ensure_identity,
    load_ca,
    load_edge_signer,
    migrate_legacy,
    needs_renewal,
    renew_identities,
)
from federation.pki.chain import ChainPolicy, identity_of_certificate, not_after
from federation.pki.files import (
    EDGE,
    NODES,
    CertificateFiles,
    PKIPaths,
    certificate_files,
    leaf_certificate,
    write_file,
    write_private_file,
)
from federation.pki.identity import (
    ADMIN_NAME,
    Identity,
    NoIssuerKey,
    PKIError,
    parse_spiffe_id,
    validate_name,
    validate_role,
)
from federation.pki.issuer import Issuer

__all__ = [
    "ADMIN_NAME",
    "EDGE",
    "NODES",
    "CertificateAuthority",
    "CertificateFiles",
    "ChainPolicy",
    "EdgeSigner",
    "Identity",
    "Issuer",
    "NoIssuerKey",
    "PKIError",
    "PKIPaths",
    "certificate_files",
    "ensure_identity",
    "identity_of_certificate",
    "leaf_certificate",
    "load_ca",
    "load_edge_signer",
    "migrate_legacy",
    "needs_renewal",
    "not_after",
    "parse_spiffe_id",
    "renew_identities",
    "validate_name",
    "validate_role",
    "write_file",
    "write_private_file",
]
