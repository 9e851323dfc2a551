"""What the vault keeps and shows: secrets' metadata, issued shares, escrowed objects
reserved but not yet stored, pages of a listing and their tokens, and the sealed
object of a stored row. No value and no share is ever part of a ``repr``."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from federation.crypto.envelope import SealedObject
from federation.crypto.shares import Share
from federation.errors import ErrorCode, FederationError

MAX_NAME: Final = 200
"""Longest secret name (and id in a page token)."""


@dataclass(frozen=True)
class SecretInfo:
    """Metadata of a secret; never its value or any share."""

    id: str
    tenant_id: str
    name: str
    version: int
    state: str
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    destroyed_at: dt.datetime | None
    recoveries: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "vault.secret", "tenant_id": self.tenant_id,
            "name": self.name, "version": self.version, "state": self.state,
            "created_by": self.created_by, "created_at": int(self.created_at.timestamp()),
            "updated_at": int(self.updated_at.timestamp()),
            "destroyed_at": int(self.destroyed_at.timestamp()) if self.destroyed_at else None,
            "recoveries": self.recoveries,
        }


@dataclass(frozen=True, repr=False)
class IssuedShare:
    """A secret's metadata and its (new) client share, shown to the caller once."""

    info: SecretInfo
    client_share: str

    def __repr__(self) -> str:
        return f"IssuedShare(info={self.info!r})"


@dataclass(frozen=True, repr=False)
class PendingObject:
    """A reserved escrowed object: its data key and gateway share live only in memory
    until :meth:`VaultService.commit_escrowed` seals and stores them."""

    tenant_id: str
    object_id: str
    key_id: str
    key: bytes
    gateway_share: Share

    def __repr__(self) -> str:
        return f"PendingObject(tenant_id={self.tenant_id!r}, object_id={self.object_id!r})"


@dataclass(frozen=True)
class SecretPage:
    secrets: list[SecretInfo]
    next_page_token: str


def secret_info(row: asyncpg.Record) -> SecretInfo:
    return SecretInfo(
        id=row["id"], tenant_id=row["tenant_id"], name=row["name"], version=row["version"],
        state=row["state"], created_by=row["created_by"], created_at=row["created_at"],
        updated_at=row["updated_at"], destroyed_at=row["destroyed_at"],
        recoveries=row["recoveries"],
    )


def sealed_object(row: asyncpg.Record) -> SealedObject:
    return SealedObject(
        tenant_id=row["tenant_id"], object_id=row["id"], version=row["version"],
        key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]),
        kcv=bytes(row["kcv"]),
    )


def token_after(info: SecretInfo) -> str:
    """The page token of the listing's next page, which starts after ``info``."""
    raw = f"{info.created_at.isoformat()}|{info.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def parse_page_token(token: str) -> tuple[dt.datetime, str]:
    if not token:
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC), ""
    decoded = _decode_page_token(token)
    if decoded is None:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "page_token is not valid",
                              param="page_token")
    return decoded


def _decode_page_token(token: str) -> tuple[dt.datetime, str] | None:
    """What ``token_after`` wrote, or ``None``: an aware time and an id of printable
    ASCII (anything else, a NUL say, would reach PostgreSQL, which refuses it)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        moment, _, secret_id = raw.partition("|")
        after = dt.datetime.fromisoformat(moment)
    except (ValueError, UnicodeDecodeError):
        return None
    if (after.tzinfo is None or not secret_id.isascii() or not secret_id.isprintable()
            or len(secret_id) > MAX_NAME):
        return None
    return after, secret_id
