"""Envelope encryption with AES-256-GCM, and wrapping of shares under a wrapping key.

Each object version gets a fresh 256-bit data key; nothing else is ever
encrypted under it. The 96-bit nonce is random (safe: one message per key).
The associated data binds the tenant, the object id and the version, so a
ciphertext copied to another tenant, object or version does not decrypt.

A key check value (KCV) is stored next to the ciphertext:
``HMAC-SHA256(key, "federation-kcv")`` truncated to 16 bytes. It is checked,
in constant time, *before* decryption, which separates the two failures that
AES-GCM alone would conflate:

* the key is wrong (a wrong, corrupted, foreign or stale share was used) →
  :class:`~federation.crypto.shares.InvalidShare`, "invalid share";
* the key is right but the tag does not verify (the stored ciphertext, nonce or
  its binding was altered or moved) → :class:`CiphertextInvalid`.

The KCV reveals nothing useful about the key: it is a PRF output under the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from federation.crypto.shares import KEY_BYTES, InvalidShare, Share, combine_shares

NONCE_BYTES: Final = 12
KCV_BYTES: Final = 16
_KCV_MESSAGE: Final = b"federation-kcv"
_AAD_TAG: Final = b"federation.envelope.v1\x00"
_WRAP_TAG: Final = b"federation.wrap.v1\x00"
_WRAP_VERSION: Final = 1


class CiphertextInvalid(Exception):
    """The key is right but the ciphertext does not authenticate: altered or moved."""

    def __init__(self) -> None:
        super().__init__(
            "ciphertext does not authenticate: it was altered, or belongs to another "
            "tenant, object or version"
        )


class UnwrapError(Exception):
    """A wrapped value does not open under this wrapping key and context."""


def new_data_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_check_value(key: bytes) -> bytes:
    return hmac.new(key, _KCV_MESSAGE, hashlib.sha256).digest()[:KCV_BYTES]


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def associated_data(tenant_id: str, object_id: str, version: int) -> bytes:
    """Unambiguous (length-prefixed) binding of a ciphertext to its place."""
    return (
        _AAD_TAG + _field(tenant_id.encode()) + _field(object_id.encode())
        + struct.pack(">Q", version)
    )


@dataclass(frozen=True, repr=False)
class SealedObject:
    """An encrypted object version, as stored. Holds no key material."""

    tenant_id: str
    object_id: str
    version: int
    key_id: str
    nonce: bytes
    ciphertext: bytes
    """AES-GCM output (ciphertext ‖ 16-byte tag)."""
    kcv: bytes

    def __repr__(self) -> str:
        return (
            f"SealedObject(tenant_id={self.tenant_id!r}, object_id={self.object_id!r}, "
            f"version={self.version}, key_id={self.key_id!r})"
        )


def seal(
    key: bytes, plaintext: bytes, *, tenant_id: str, object_id: str, version: int, key_id: str
) -> SealedObject:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a data key is {KEY_BYTES} bytes")
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(
        nonce, plaintext, associated_data(tenant_id, object_id, version)
    )
    return SealedObject(
        tenant_id, object_id, version, key_id, nonce, ciphertext, key_check_value(key)
    )


def verify_key(key: bytes, sealed: SealedObject) -> None:
    """:class:`InvalidShare` unless ``key`` is the key ``sealed`` was made with."""
    if not hmac.compare_digest(key_check_value(key), sealed.kcv):
        raise InvalidShare("the shares do not open this object")


def open_sealed(key: bytes, sealed: SealedObject) -> bytes:
    """Decrypt; :class:`InvalidShare` for a wrong key, :class:`CiphertextInvalid` otherwise."""
    verify_key(key, sealed)
    try:
        return AESGCM(key).decrypt(
            sealed.nonce, sealed.ciphertext,
            associated_data(sealed.tenant_id, sealed.object_id, sealed.version),
        )
    except InvalidTag:
        raise CiphertextInvalid() from None


def open_with_shares(first: Share, second: Share, sealed: SealedObject) -> bytes:
    """Combine two shares, verify the key against the KCV, decrypt."""
    return open_sealed(recover_key(first, second, sealed), sealed)


def recover_key(first: Share, second: Share, sealed: SealedObject) -> bytes:
    """The verified data key of ``sealed`` from two of its shares."""
    for share in (first, second):
        if share.key_id != sealed.key_id:
            raise InvalidShare("the share belongs to another key (stale or foreign)")
    key = combine_shares(first, second)
    verify_key(key, sealed)
    return key


def wrap(wrapping_key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt a small value (a share) under a wrapping key, bound to ``context``.

    Output: version (1 byte) ‖ nonce (12) ‖ AES-GCM ciphertext and tag.
    """
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(wrapping_key).encrypt(nonce, plaintext, _WRAP_TAG + context)
    return bytes([_WRAP_VERSION]) + nonce + sealed


def unwrap(wrapping_key: bytes, wrapped: bytes, context: bytes) -> bytes:
    if len(wrapped) < 1 + NONCE_BYTES + 16 or wrapped[0] != _WRAP_VERSION:
        raise UnwrapError("wrapped value is malformed")
    nonce, sealed = wrapped[1 : 1 + NONCE_BYTES], wrapped[1 + NONCE_BYTES :]
    try:
        return AESGCM(wrapping_key).decrypt(nonce, sealed, _WRAP_TAG + context)
    except InvalidTag:
        raise UnwrapError(
            "wrapped value does not open: wrong wrapping key, or moved to another record"
        ) from None


def wrap_context(*parts: str | int) -> bytes:
    """A length-prefixed context from labelled parts (e.g. purpose, tenant, object, key id)."""
    return b"".join(_field(str(p).encode()) for p in parts)
