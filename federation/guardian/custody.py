"""Guardian custody: deposit, release (rate-limited, audited first), destroy, list.

The guardian holds the third share of every vault data key. Shares are stored
wrapped (AES-256-GCM) under the guardian's wrapping key, a 0600 file under its
home, in schema ``guardian`` which only the ``federation_guardian`` role can
read; every statement here runs under ``SET LOCAL ROLE federation_guardian``.

A release is the only way share material leaves. It needs a caller with the
gateway or admin role (the mTLS identity), the admin key id and a reason; it is
limited per tenant (default 5 per hour) and is written to thermal memory before
the share is returned: if the audit record cannot be written, nothing is
released (fail closed).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from federation.clock import Clock, utc_now
from federation.config import GuardianConfig
from federation.crypto.envelope import UnwrapError, unwrap, wrap, wrap_context
from federation.crypto.shares import MalformedShare, Share
from federation.db import transaction_as
from federation.errors import ErrorCode, FederationError
from federation.fields import storable
from federation.memory import AuditEntry, AuditSink
from federation.paging import invalid_page_token, sequence_token
from federation.paging import page_size as checked_page_size
from federation.pki import Identity
from federation.tenancy import checked_tenant_id

log = logging.getLogger(__name__)

ROLE: Final = "federation_guardian"
RELEASE_ROLES: Final = frozenset({"gateway", "admin"})
_MAX_ID: Final = 200
_MAX_REASON: Final = 1000



@dataclass(frozen=True)
class ShareInfo:
    """Metadata of a held share; never the material."""

    tenant_id: str
    object_id: str
    key_id: str
    share_index: int
    held: bool
    deposit_time: dt.datetime
    destroy_time: dt.datetime | None
    release_count: int
    last_release_time: dt.datetime | None


@dataclass(frozen=True)
class SharePage:
    shares: list[ShareInfo]
    next_page_token: str


def _identifier(value: str, name: str) -> str:
    """An id exactly as its caller stored it: refused, never rewritten, when it has
    surrounding spaces (a share deposited under " k1" must not answer for "k1")."""
    if value != value.strip():
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{name} must not have surrounding spaces", param=name)
    return _require(value, name)


def _require(value: str, name: str, limit: int = _MAX_ID) -> str:
    value = value.strip()
    if not value:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{name} is required", param=name)
    if len(value) > limit:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, f"{name} is longer than {limit} characters", param=name
        )
    return storable(value, name)


def _context(tenant_id: str, object_id: str, key_id: str, index: int) -> bytes:
    return wrap_context("guardian-share", tenant_id, object_id, key_id, index)


class GuardianCustody:
    """The guardian's share custody over PostgreSQL (schema ``guardian``)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        wrapping_key: bytes,
        audit: AuditSink,
        config: GuardianConfig,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self._pool = pool
        self._wrapping_key = wrapping_key
        self._audit = audit
        self._config = config
        self._clock = clock

    async def deposit(
        self, caller: Identity, *, tenant_id: str, object_id: str, key_id: str,
        share_index: int, share_text: str,
    ) -> ShareInfo:
        tenant_id = checked_tenant_id(tenant_id)
        object_id = _identifier(object_id, "object_id")
        key_id = _identifier(key_id, "key_id")
        try:
            share = Share.decode(share_text)
        except MalformedShare as exc:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, str(exc), param="share") from None
        if share.key_id != key_id or share.index != share_index:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                "the share's key id and index do not match key_id and share_index",
                param="share",
            )
        wrapped = wrap(
            self._wrapping_key, share.encode().encode(),
            _context(tenant_id, object_id, key_id, share_index),
        )
        now = self._clock()
        async with transaction_as(self._pool, ROLE) as conn:
            row = await conn.fetchrow(
                "INSERT INTO guardian.shares (tenant_id, object_id, key_id, share_index, wrapped,"
                " state, deposited_by, deposit_time) VALUES ($1, $2, $3, $4, $5, 'held', $6, $7)"
                " ON CONFLICT DO NOTHING RETURNING *",
                tenant_id, object_id, key_id, share_index, wrapped, caller.spiffe_id, now,
            )
            if row is None:
                raise FederationError(
                    ErrorCode.ALREADY_EXISTS,
                    f"a share of key {key_id} for object {object_id} is already held",
                )
            await self._audit.record(AuditEntry(
                actor=caller.spiffe_id, action="guardian.share.deposit", tenant_id=tenant_id,
                subject=object_id,
                attributes={"key_id": key_id, "share_index": str(share_index)},
            ))
        return _info(row)

    async def release(
        self, caller: Identity, *, tenant_id: str, object_id: str, key_id: str,
        requested_by_key_id: str, reason: str,
    ) -> tuple[str, ShareInfo]:
        """The share's text form, once the release is rate-checked and audited."""
        if caller.role not in RELEASE_ROLES:
            raise FederationError(
                ErrorCode.PERMISSION_DENIED,
                f"role {caller.role!r} may not receive shares; only the gateway or an admin",
            )
        tenant_id = checked_tenant_id(tenant_id)
        object_id = _identifier(object_id, "object_id")
        key_id = _identifier(key_id, "key_id")
        requested_by_key_id = _identifier(requested_by_key_id, "requested_by_key_id")
        reason = _require(reason, "reason", _MAX_REASON)
        now = self._clock()
        window = dt.timedelta(seconds=self._config.release_window_seconds)
        async with transaction_as(self._pool, ROLE) as conn:
            # Serialise releases of one tenant so concurrent calls cannot overrun the limit.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('guardian-release:' || $1, 0))",
                tenant_id,
            )
            row = await _locked_share(conn, tenant_id, object_id, key_id)
            if row["state"] != "held":
                raise FederationError(
                    ErrorCode.FAILED_PRECONDITION, "that share was destroyed; it cannot be released"
                )
            recent = await conn.fetch(
                "SELECT released_at FROM guardian.releases WHERE tenant_id = $1 "
                "AND released_at > $2 ORDER BY released_at",
                tenant_id, now - window,
            )
            if len(recent) >= self._config.release_limit:
                limit = self._config.release_limit
                oldest: dt.datetime = recent[len(recent) - limit]["released_at"]
                retry_after = max(1.0, (oldest + window - now).total_seconds())
                log.warning("share release refused: rate limit",
                            extra={"tenant_id": tenant_id, "caller": caller.spiffe_id})
                raise FederationError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"tenant {tenant_id} has had {len(recent)} share releases in the last "
                    f"{_human(window)}; the limit is {self._config.release_limit}",
                    retry_after_seconds=retry_after,
                )
            await conn.execute(
                "INSERT INTO guardian.releases (tenant_id, object_id, key_id, released_at, caller,"
                " requested_by_key_id, reason) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                tenant_id, object_id, key_id, now, caller.spiffe_id, requested_by_key_id, reason,
            )
            updated = await conn.fetchrow(
                "UPDATE guardian.shares SET release_count = release_count + 1, "
                "last_release_time = $4 WHERE tenant_id = $1 AND object_id = $2 AND key_id = $3 "
                "RETURNING *",
                tenant_id, object_id, key_id, now,
            )
            assert updated is not None  # the row is locked above
            try:
                share_text = unwrap(
                    self._wrapping_key, bytes(row["wrapped"]),
                    _context(tenant_id, object_id, key_id, row["share_index"]),
                ).decode()
            except UnwrapError:
                log.error("stored share does not unwrap",
                          extra={"tenant_id": tenant_id, "object_id": object_id})
                raise FederationError(
                    ErrorCode.DATA_LOSS,
                    "the stored share does not open under the guardian's wrapping key",
                ) from None
            # Audit before answering, inside the transaction: no record, no release.
            await self._audit.record(AuditEntry(
                actor=caller.spiffe_id, action="guardian.share.release", tenant_id=tenant_id,
                subject=object_id,
                attributes={
                    "key_id": key_id, "requested_by_key_id": requested_by_key_id,
                    "reason": reason, "caller_role": caller.role,
                    "release_count": str(updated["release_count"]),
                },
            ))
        return share_text, _info(updated)

    async def destroy(
        self, caller: Identity, *, tenant_id: str, object_id: str, key_id: str, reason: str,
    ) -> ShareInfo:
        """Erase the share's material (idempotent); the record stays."""
        tenant_id = checked_tenant_id(tenant_id)
        object_id = _identifier(object_id, "object_id")
        key_id = _identifier(key_id, "key_id")
        reason = _require(reason, "reason", _MAX_REASON)
        now = self._clock()
        async with transaction_as(self._pool, ROLE) as conn:
            row = await _locked_share(conn, tenant_id, object_id, key_id)
            if row["state"] == "destroyed":
                return _info(row)
            updated = await conn.fetchrow(
                "UPDATE guardian.shares SET wrapped = NULL, state = 'destroyed', destroy_time = $4"
                " WHERE tenant_id = $1 AND object_id = $2 AND key_id = $3 RETURNING *",
                tenant_id, object_id, key_id, now,
            )
            assert updated is not None  # the row is locked above
            await self._audit.record(AuditEntry(
                actor=caller.spiffe_id, action="guardian.share.destroy", tenant_id=tenant_id,
                subject=object_id, attributes={"key_id": key_id, "reason": reason},
            ))
        return _info(updated)

    async def list(self, tenant_id: str, page_size: int = 0, page_token: str = "") -> SharePage:
        tenant_id = checked_tenant_id(tenant_id)
        size = checked_page_size(page_size)
        after = _parse_token(page_token)
        async with transaction_as(self._pool, ROLE) as conn:
            rows = await conn.fetch(
                "SELECT * FROM guardian.shares WHERE tenant_id = $1 AND id > $2 "
                "ORDER BY id LIMIT $3",
                tenant_id, after, size + 1,
            )
        page = [_info(r) for r in rows[:size]]
        token = _make_token(rows[size - 1]["id"]) if len(rows) > size else ""
        return SharePage(page, token)


def _info(row: asyncpg.Record) -> ShareInfo:
    return ShareInfo(
        tenant_id=row["tenant_id"], object_id=row["object_id"], key_id=row["key_id"],
        share_index=row["share_index"], held=row["state"] == "held",
        deposit_time=row["deposit_time"], destroy_time=row["destroy_time"],
        release_count=row["release_count"], last_release_time=row["last_release_time"],
    )


def _make_token(row_id: Any) -> str:
    return base64.urlsafe_b64encode(f"s{int(row_id)}".encode()).decode().rstrip("=")


def _parse_token(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise invalid_page_token() from None
    if not raw.startswith("s"):
        raise invalid_page_token()
    return sequence_token(raw[1:])


def _human(window: dt.timedelta) -> str:
    seconds = int(window.total_seconds())
    if seconds % 3600 == 0:
        hours = seconds // 3600
        return "hour" if hours == 1 else f"{hours} hours"
    return f"{seconds} seconds"


async def _locked_share(conn: PoolConnectionProxy[Any], tenant_id: str, object_id: str,
                        key_id: str) -> asyncpg.Record:
    """The share's row, locked for this transaction; NOT_FOUND when there is none."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM guardian.shares WHERE tenant_id = $1 AND object_id = $2 "
        "AND key_id = $3 FOR UPDATE",
        tenant_id, object_id, key_id,
    )
    if row is None:
        raise FederationError(ErrorCode.NOT_FOUND, "the guardian holds no such share")
    return row
