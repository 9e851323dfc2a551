"""Thermal memory records, their tiers, and the hash that chains them.

The chain hash of a record is ``SHA-256(prev_hash || canonical(record))``. The
canonical encoding is fixed-order and length-prefixed, so no two different
records encode to the same bytes (no ambiguity from separators or JSON key
order). It covers everything a record *says*: sequence, tenant, actor, action,
subject, request id, creation time (integer microseconds, the precision
PostgreSQL stores), attributes (sorted by key) and the uncompressed body. It
does not cover temperature or storage form, which change by design.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

GENESIS_HASH: Final = bytes(32)
"""``prev_hash`` of the first record."""

_DOMAIN_TAG: Final = b"federation.thermal-memory.v1\x00"
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class Tier(enum.Enum):
    """The roadmap's temperature tiers (section 3.4)."""

    HOT = "hot"  # 70-100
    WARM = "warm"  # 40-69
    COLD = "cold"  # 5-39
    EMBER = "ember"  # 0-4

    @property
    def bounds(self) -> tuple[int, int]:
        """Inclusive temperature range of the tier."""
        return _TIER_BOUNDS[self]


_TIER_BOUNDS: Final = {
    Tier.HOT: (70, 100),
    Tier.WARM: (40, 69),
    Tier.COLD: (5, 39),
    Tier.EMBER: (0, 4),
}


def tier_for(temperature: int) -> Tier:
    for tier, (low, high) in _TIER_BOUNDS.items():
        if low <= temperature <= high:
            return tier
    raise ValueError(f"temperature {temperature} is outside 0..100")


def clamp_temperature(value: int) -> int:
    return max(0, min(100, value))


@dataclass(frozen=True)
class AuditEntry:
    """What a writer asks thermal memory to remember. Never holds secrets."""

    actor: str
    action: str
    tenant_id: str = ""
    subject: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    request_id: str = ""
    """Empty: the request id of the call being served, if any."""
    temperature: int | None = None
    """Initial temperature; ``None`` uses the configured default (hot)."""


@dataclass(frozen=True)
class MemoryRecord:
    """One record of the chain, as stored (body always uncompressed here)."""

    sequence: int
    tenant_id: str
    actor: str
    action: str
    subject: str
    request_id: str
    created_at: dt.datetime
    attributes: Mapping[str, str]
    body: bytes
    prev_hash: bytes
    hash: bytes
    temperature: int
    compressed: bool = False

    @property
    def tier(self) -> Tier:
        return tier_for(self.temperature)

    def computed_hash(self) -> bytes:
        """The hash this record's content and ``prev_hash`` should have."""
        return chain_hash(
            self.prev_hash,
            sequence=self.sequence,
            tenant_id=self.tenant_id,
            actor=self.actor,
            action=self.action,
            subject=self.subject,
            request_id=self.request_id,
            created_at=self.created_at,
            attributes=self.attributes,
            body=self.body,
        )


def to_microseconds(moment: dt.datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def chain_hash(
    prev_hash: bytes,
    *,
    sequence: int,
    tenant_id: str,
    actor: str,
    action: str,
    subject: str,
    request_id: str,
    created_at: dt.datetime,
    attributes: Mapping[str, str],
    body: bytes,
) -> bytes:
    digest = hashlib.sha256(_DOMAIN_TAG)
    digest.update(prev_hash)
    digest.update(struct.pack(">qq", sequence, to_microseconds(created_at)))
    for text in (tenant_id, actor, action, subject, request_id):
        _update_field(digest, text.encode())
    digest.update(struct.pack(">I", len(attributes)))
    for key in sorted(attributes):
        _update_field(digest, key.encode())
        _update_field(digest, attributes[key].encode())
    _update_field(digest, body)
    return digest.digest()


def _update_field(digest: hashlib._Hash, data: bytes) -> None:
    digest.update(struct.pack(">Q", len(data)))
    digest.update(data)
