"""The API key format: ``fed_<key id>_<secret><checksum>``.

Like GitHub tokens: a fixed prefix that secret scanners can match, a key id
(16 base62 characters, about 95 random bits, not secret: it names the key in
logs, audits and the CLI), a secret (43 base62 characters encoding 32 random
bytes) and a 6-character base62 CRC32 of everything before it. The checksum
lets :func:`parse` reject a truncated or mistyped key without a database
lookup; it is not a security measure (anyone can compute it).
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Final

from federation.errors import ErrorCode, FederationError

PREFIX: Final = "fed_"
KEY_ID_LENGTH: Final = 16
SECRET_LENGTH: Final = 43  # 62**43 > 2**256: 32 random bytes always fit
CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62: Final = f"[{_ALPHABET}]"
_KEY_PATTERN: Final = re.compile(
    rf"^{PREFIX}({_B62}{{{KEY_ID_LENGTH}}})_({_B62}{{{SECRET_LENGTH}}})({_B62}{{{CHECKSUM_LENGTH}}})$"
)
_KEY_ID_PATTERN: Final = re.compile(rf"^{_B62}{{{KEY_ID_LENGTH}}}$")


@dataclass(frozen=True)
class ParsedKey:
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"ParsedKey(key_id={self.key_id!r}, secret=<redacted>)"


def base62(value: int, width: int) -> str:
    """``value`` in base62, left-padded with zeros to ``width`` characters."""
    digits: list[str] = []
    while value:
        value, rem = divmod(value, 62)
        digits.append(_ALPHABET[rem])
    if len(digits) > width:
        raise ValueError(f"{value} does not fit in {width} base62 digits")
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    return base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def new_key_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(KEY_ID_LENGTH))


def new_secret() -> str:
    return base62(int.from_bytes(secrets.token_bytes(32), "big"), SECRET_LENGTH)


def format_key(key_id: str, secret: str) -> str:
    body = f"{PREFIX}{key_id}_{secret}"
    return body + checksum(body)


def generate(key_id: str | None = None) -> tuple[ParsedKey, str]:
    """A fresh secret for ``key_id`` (or a new key id): the parts and the full key."""
    parsed = ParsedKey(key_id or new_key_id(), new_secret())
    return parsed, format_key(parsed.key_id, parsed.secret)


MALFORMED = ("malformed API key: expected fed_<key id>_<secret> as issued by "
             "`federation keys issue`")


def parse(key: str) -> ParsedKey:
    """Split a presented key, refusing malformed or mistyped ones before any lookup."""
    match = _KEY_PATTERN.match(key.strip())
    if match is None:
        raise FederationError(ErrorCode.UNAUTHENTICATED, MALFORMED)
    key_id, secret, check = match.groups()
    if checksum(f"{PREFIX}{key_id}_{secret}") != check:
        raise FederationError(
            ErrorCode.UNAUTHENTICATED,
            "API key checksum mismatch: the key was mistyped or truncated",
        )
    return ParsedKey(key_id, secret)


def validate_key_id(key_id: str) -> str:
    # fullmatch: with match, "$" also matches before a final newline, and such an id
    # reached the database (NOT_FOUND, the newline echoed) instead of being refused.
    if not _KEY_ID_PATTERN.fullmatch(key_id):
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, f"{key_id!r} is not a key id (16 letters and digits)",
            param="key_id",
        )
    return key_id
