"""Per-tenant settings (table ``tenant_settings``, migration 0022).

Operators change them (``federation tenants ...``, through :func:`set_store_transcripts`);
each change is written to thermal memory inside the same transaction, so a change that
cannot be audited is not made. The gateway only reads them, through
:class:`TenantSettingsReader`, which caches each tenant's answer for a few seconds so the
chat hot path does not pay a database round trip per request: a change takes up to
``ttl_seconds`` to reach a running gateway.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from federation.memory import AuditEntry, AuditSink
from federation.tenancy import checked_tenant_id

DEFAULT_TTL_SECONDS: Final = 5.0
_CACHE_LIMIT: Final = 10_000


@dataclass(frozen=True)
class TenantSettings:
    tenant_id: str
    store_transcripts: bool
    updated_by: str
    updated_at: dt.datetime | None
    """``None``: the tenant has no row, these are the defaults."""

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id, "store_transcripts": self.store_transcripts,
            "updated_by": self.updated_by,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def _tenant(tenant_id: str) -> str:
    return checked_tenant_id(tenant_id)


async def get_settings(
    conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any] | asyncpg.Pool, tenant_id: str
) -> TenantSettings:
    row = await conn.fetchrow("SELECT * FROM tenant_settings WHERE tenant_id = $1", tenant_id)
    if row is None:
        return TenantSettings(tenant_id, False, "", None)
    return TenantSettings(row["tenant_id"], row["store_transcripts"], row["updated_by"],
                          row["updated_at"])


async def set_store_transcripts(
    pool: asyncpg.Pool, audit: AuditSink, *, tenant_id: str, enabled: bool, actor: str,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> TenantSettings:
    """Opt ``tenant_id`` in or out of stored transcripts; audited before it commits."""
    tenant_id = _tenant(tenant_id)
    async with pool.acquire() as conn, conn.transaction():
        before = await get_settings(conn, tenant_id)
        row = await conn.fetchrow(
            "INSERT INTO tenant_settings (tenant_id, store_transcripts, updated_by, updated_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO UPDATE SET"
            " store_transcripts = excluded.store_transcripts,"
            " updated_by = excluded.updated_by, updated_at = excluded.updated_at RETURNING *",
            tenant_id, enabled, actor, clock(),
        )
        assert row is not None
        await audit.record(AuditEntry(
            actor=actor, action="tenant.settings.update", tenant_id=tenant_id,
            subject="store_transcripts",
            attributes={"store_transcripts": str(enabled).lower(),
                        "previous": str(before.store_transcripts).lower()},
        ))
    return TenantSettings(row["tenant_id"], row["store_transcripts"], row["updated_by"],
                          row["updated_at"])


class TenantSettingsReader:
    """The gateway's read side: ``stores_transcripts(tenant)`` with a short TTL cache."""

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float = DEFAULT_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, bool]] = {}

    async def stores_transcripts(self, tenant_id: str) -> bool:
        if not tenant_id:
            return False
        now = self._clock()
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        value = bool(await self._pool.fetchval(
            "SELECT store_transcripts FROM tenant_settings WHERE tenant_id = $1", tenant_id))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[tenant_id] = (now + self._ttl, value)
        return value
