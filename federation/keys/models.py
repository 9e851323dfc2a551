"""The key authority's value types: keys, states, scopes, requests and results."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Generic, TypeVar

from federation.errors import ErrorCode, FederationError
from federation.fields import storable
from federation.keys.quota import MAX_TOKENS
from federation.keys.strength import Accumulator
from federation.prototime import MAX_DURATION_SECONDS
from federation.tenancy import checked_tenant_id

SCOPES: Final = frozenset({
    "chat", "embeddings", "council", "council:chiefs", "council:specialist", "memory:read",
    "memory:audit", "edge", "admin", "vault:read", "vault:write",
})
"""Every scope a key may carry (common.proto lists them)."""

MAX_DESCRIPTION_BYTES: Final = 256
MAX_REQUESTS_PER_MINUTE: Final = 2**31 - 1
"""The request counter's range (integer)."""
MAX_TOKEN_QUOTA: Final = MAX_TOKENS - 1
"""The most tokens a counter holds: it saturates there
(:data:`~federation.keys.quota.TOKENS_STORED`), so that a counter plus any charge still
fits its bigint. A quota above it could never be reached: a key of 2**62 tokens or more
took charges for ever, its counter stuck below the quota."""
MAX_SOURCE_CHARS: Final = 256
"""Longest VerifyKey source (an address, or a certificate's identity). A source is part
of the key of its failed-attempt row: with a tenant id of up to 200 characters, 256
characters of up to 4 bytes each keep that row within the index's 2704 bytes."""
T = TypeVar("T")


class KeyState(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"
    EXPIRED = "expired"  # derived from expires_at, never stored


class StrengthKind(enum.Enum):
    ISSUED = "issued"
    VERIFIED_USE = "verified_use"
    FAILED_ATTEMPT = "failed_attempt"
    DECAY = "decay"
    ROTATION = "rotation"
    SUSPENSION = "suspension"
    REINSTATEMENT = "reinstatement"
    REVOCATION = "revocation"


@dataclass(frozen=True)
class KeyRecord:
    """A key's stored state. Holds hashes, never the secret."""

    tenant_id: str
    key_id: str
    scopes: tuple[str, ...]
    description: str
    stored_state: KeyState
    secret_hash: bytes
    old_secret_hash: bytes | None
    old_secret_until: dt.datetime | None
    created_at: dt.datetime
    strength_epoch: dt.datetime
    usage: Accumulator
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    requests_per_minute: int | None
    token_quota: int | None
    quota_period_seconds: int | None

    def state_at(self, now: dt.datetime) -> KeyState:
        if self.stored_state is KeyState.REVOKED:
            return KeyState.REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return KeyState.EXPIRED
        return self.stored_state

    def grants(self, scope: str) -> bool:
        """``council`` also grants ``council:chiefs``; an empty scope asks for nothing."""
        return not scope or scope in self.scopes or scope.split(":", 1)[0] in self.scopes


@dataclass(frozen=True)
class KeyView:
    """A key as shown to callers: metadata plus its current strength in [0, 1]."""

    record: KeyRecord
    state: KeyState
    strength: float


@dataclass(frozen=True)
class IssueRequest:
    tenant_id: str
    scopes: Sequence[str]
    requests_per_minute: int | None = None
    token_quota: int | None = None
    quota_period_seconds: int | None = None
    description: str = ""
    ttl_seconds: float | None = None

    def validated(self) -> IssueRequest:
        checked_tenant_id(self.tenant_id)
        if not self.scopes:
            raise _invalid("at least one scope is required", "scopes")
        unknown = sorted(set(self.scopes) - SCOPES)
        if unknown:
            raise _invalid(f"unknown scope(s) {_few(unknown)}; scopes are: "
                           + ", ".join(sorted(SCOPES)), "scopes")
        if self.requests_per_minute is not None and not (
                0 < self.requests_per_minute <= MAX_REQUESTS_PER_MINUTE):
            raise _invalid(f"requests_per_minute must be from 1 to {MAX_REQUESTS_PER_MINUTE}",
                           "requests_per_minute")
        if self.token_quota is not None and not 0 < self.token_quota <= MAX_TOKEN_QUOTA:
            raise _invalid(f"token_quota must be from 1 to {MAX_TOKEN_QUOTA}", "token_quota")
        if (self.token_quota is None) != (self.quota_period_seconds is None):
            raise _invalid("token_quota and quota_period go together", "quota_period")
        if self.quota_period_seconds is not None:
            check_duration(self.quota_period_seconds, "quota_period")
        storable(self.description, "description")
        if len(self.description.encode()) > MAX_DESCRIPTION_BYTES:
            raise _invalid("description is longer than 256 bytes", "description")
        if self.ttl_seconds is not None:
            check_duration(self.ttl_seconds, "ttl")
        return replace(self, scopes=tuple(dict.fromkeys(self.scopes)))  # each once


@dataclass(frozen=True)
class IssuedKey:
    """A new or rotated key: the full secret, shown this once."""

    view: KeyView
    secret: str = field(repr=False)
    old_secret_expires_at: dt.datetime | None = None


@dataclass(frozen=True)
class StrengthSample:
    at: dt.datetime
    strength: float
    kind: StrengthKind
    source: str


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


def check_duration(seconds: float, param: str, *, zero_allowed: bool = False) -> None:
    """A positive duration (or zero, when allowed) of at most :data:`MAX_DURATION_SECONDS`:
    past that, dates overflow and the value was a typo anyway."""
    long_enough = seconds >= 0 if zero_allowed else seconds > 0
    if not (long_enough and seconds <= MAX_DURATION_SECONDS):
        raise _invalid(f"{param} must be {'0 or more' if zero_allowed else 'positive'} and "
                       f"at most {MAX_DURATION_SECONDS // 86400} days", param)


_SHOWN_SCOPES: Final = 5
_SHOWN_SCOPE_CHARS: Final = 40


def _few(names: list[str]) -> str:
    """A few of ``names``, each cut short: the message travels in a gRPC trailer, and one
    naming thousands of long scopes overflowed its size limit, so the caller got a
    transport error (RESOURCE_EXHAUSTED, "Stream removed") instead of this one."""
    shown = [n if len(n) <= _SHOWN_SCOPE_CHARS else n[:_SHOWN_SCOPE_CHARS] + "…"
             for n in names[:_SHOWN_SCOPES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _invalid(message: str, param: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)
