"""The restore event: the one record that may follow a gap in the audit chain.

Restoring a database backup rewinds the chain to the backup's last record B.
Records written after B are gone, but the guardian has signed checkpoints of some
of them (up to C, in a file off the database). A chain that simply went on from
B + 1 would contradict those checkpoints for ever. So ``federation restore``
appends one record, at sequence C + 1, linked to record B, that says so:

* which backup (its id, its last sequence B and hash), when, and who restored it;
* which records are lost according to the guardian's newest checkpoint:
  B + 1 .. C (``lost_count`` = C - B; records written after C and before the
  database was lost were never checkpointed, so nobody can say how many);
* signed by an ``admin`` identity of this federation (ECDSA, its certificate in the
  record's body), so that whoever can write to the database cannot fake one.

Verification accepts a gap only when a valid restore event declares exactly that
gap, and reports every restore event for ever (``federation audit verify``).
Numbering on from C + 1 keeps sequence numbers unique (no two records ever share
one) and lets the guardian go on signing checkpoints above C without any change
to its monotonic rule.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.memory.records import AuditEntry, MemoryRecord
from federation.pki import PKIError, parse_spiffe_id

RESTORE_ACTION: Final = "memory.restore"
"""Reserved: RecordMemory refuses it; only ``federation restore`` writes it."""

_TAG: Final = b"federation.restore-event.v1\x00"


class RestoreEventError(ValueError):
    """A record claiming to be a restore event that does not verify."""


@dataclass(frozen=True)
class RestoreClaim:
    """What a restore event says."""

    backup_id: str
    backup_time: str
    backup_sequence: int
    """B: the last record of the backup; the event links to it."""
    backup_hash: bytes
    lost_from: int
    """B + 1."""
    lost_to: int
    """C, the guardian's newest checkpoint at the restore (``lost_from - 1``: none lost
    that any checkpoint knew of)."""
    guardian_checkpoint_sequence: int
    """Newest guardian checkpoint known at the restore (0: none)."""
    guardian_checkpoint_hash: bytes
    restored_by: str
    """SPIFFE id of the admin identity that signed the event."""
    restore_time: dt.datetime | None = None
    """When the event was written (its record's time; not one of its attributes)."""

    @property
    def lost_count(self) -> int:
        return self.lost_to - self.lost_from + 1

    @property
    def event_sequence(self) -> int:
        return self.lost_to + 1

    def attributes(self) -> dict[str, str]:
        return {
            "backup_id": self.backup_id, "backup_time": self.backup_time,
            "backup_sequence": str(self.backup_sequence), "backup_hash": self.backup_hash.hex(),
            "lost_from": str(self.lost_from), "lost_to": str(self.lost_to),
            "lost_count": str(self.lost_count),
            "guardian_checkpoint_sequence": str(self.guardian_checkpoint_sequence),
            "guardian_checkpoint_hash": self.guardian_checkpoint_hash.hex(),
            "restored_by": self.restored_by,
        }

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, str]) -> RestoreClaim:
        try:
            claim = cls(
                backup_id=attributes["backup_id"], backup_time=attributes["backup_time"],
                backup_sequence=int(attributes["backup_sequence"]),
                backup_hash=bytes.fromhex(attributes["backup_hash"]),
                lost_from=int(attributes["lost_from"]), lost_to=int(attributes["lost_to"]),
                guardian_checkpoint_sequence=int(attributes["guardian_checkpoint_sequence"]),
                guardian_checkpoint_hash=bytes.fromhex(attributes["guardian_checkpoint_hash"]),
                restored_by=attributes["restored_by"],
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise RestoreEventError(f"its attributes are malformed ({exc})") from None
        if str(claim.lost_count) != attributes.get("lost_count"):
            raise RestoreEventError("its lost_count does not match its lost range")
        return claim


def _signed_message(sequence: int, prev_hash: bytes, attributes: Mapping[str, str]) -> bytes:
    canonical = json.dumps({"sequence": sequence, "prev_hash": prev_hash.hex(),
                            "attributes": dict(attributes)}, sort_keys=True,
                           separators=(",", ":"))
    return _TAG + canonical.encode()


def restore_entry(claim: RestoreClaim, prev_hash: bytes, certificate_pem: bytes,
                  private_key_pem: bytes) -> AuditEntry:
    """The signed restore event, ready to append at ``claim.event_sequence``."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RestoreEventError("the admin key is not an EC key")
    attributes = claim.attributes()
    signature = key.sign(_signed_message(claim.event_sequence, prev_hash, attributes),
                         ec.ECDSA(hashes.SHA256()))
    body = json.dumps({"certificate": certificate_pem.decode(),
                       "signature": base64.b64encode(signature).decode()}, sort_keys=True)
    return AuditEntry(actor=claim.restored_by, action=RESTORE_ACTION,
                      subject=claim.backup_id, attributes=attributes, body=body.encode())


class RestoreVerifier:
    """Checks restore events against this federation's CA: the admin certificate must be
    signed by the nodes intermediate, itself signed by the root."""

    def __init__(self, ca_certificate_pem: bytes, trust_domain: str,
                 issuer_certificate_pem: bytes) -> None:
        root = x509.load_pem_x509_certificate(ca_certificate_pem)
        self._ca = x509.load_pem_x509_certificate(issuer_certificate_pem)
        try:
            self._ca.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise RestoreEventError("the nodes CA is not issued by this federation's root"
                                    ) from None
        self._trust_domain = trust_domain

    @classmethod
    def of_home(cls, pki_directory: Path, trust_domain: str) -> RestoreVerifier | None:
        """From a home's PKI directory; ``None`` when it holds no CA certificates."""
        root, nodes = pki_directory / "ca.pem", pki_directory / "nodes-ca.pem"
        if not root.exists() or not nodes.exists():
            return None
        return cls(root.read_bytes(), trust_domain, nodes.read_bytes())

    def check(self, record: MemoryRecord) -> RestoreClaim:
        """The claim of ``record``; :class:`RestoreEventError` saying why it is not valid."""
        claim = RestoreClaim.from_attributes(record.attributes)
        if record.sequence != claim.event_sequence:
            raise RestoreEventError(
                f"it declares records {claim.lost_from}..{claim.lost_to} lost but sits at "
                f"{record.sequence}")
        if claim.backup_hash != record.prev_hash:
            raise RestoreEventError("its backup hash is not the hash it links to")
        certificate, signature = self._parse_body(record.body)
        self._check_certificate(certificate, record.created_at, claim.restored_by)
        public_key = certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise RestoreEventError("its certificate has no EC key")
        try:
            public_key.verify(signature, _signed_message(record.sequence, record.prev_hash,
                                                         record.attributes),
                              ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise RestoreEventError("its signature does not verify") from None
        return replace(claim, restore_time=record.created_at)

    @staticmethod
    def _parse_body(body: bytes) -> tuple[x509.Certificate, bytes]:
        try:
            data = json.loads(body)
            certificate = x509.load_pem_x509_certificate(data["certificate"].encode())
            signature = base64.b64decode(data["signature"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RestoreEventError("its body holds no certificate and signature") from None
        return certificate, signature

    def _check_certificate(self, certificate: x509.Certificate, signed_at: dt.datetime,
                           restored_by: str) -> None:
        try:
            certificate.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise RestoreEventError("its certificate is not issued by this federation's CA"
                                    ) from None
        if not certificate.not_valid_before_utc <= signed_at <= certificate.not_valid_after_utc:
            raise RestoreEventError("its certificate was not valid when the event was written")
        try:
            uris = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
            identity = parse_spiffe_id(uris[0] if len(uris) == 1 else "", self._trust_domain)
        except (x509.ExtensionNotFound, PKIError):
            raise RestoreEventError("its certificate names no identity of this federation"
                                    ) from None
        if identity.role != "admin":
            raise RestoreEventError(f"it is signed by {identity.spiffe_id}, not an admin")
        if identity.spiffe_id != restored_by:
            raise RestoreEventError("its restored_by is not the identity that signed it")
