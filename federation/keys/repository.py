"""SQL for API keys. Every statement names the tenant, or looks a key up by its
globally unique key id and takes the tenant from the row it finds.

``tenant_id=None`` means "any tenant" and is only passed on behalf of operators.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg

from federation.keys.models import KeyRecord, KeyState, StrengthKind, StrengthSample
from federation.keys.strength import Accumulator


class Executor(Protocol):
    """What both a pool and a connection offer."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...
    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...


def posix(moment: dt.datetime) -> float:
    return moment.timestamp()


def from_posix(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def key_from_row(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        tenant_id=row["tenant_id"], key_id=row["key_id"], scopes=tuple(row["scopes"]),
        description=row["description"], stored_state=KeyState(row["state"]),
        secret_hash=bytes(row["secret_hash"]),
        old_secret_hash=bytes(row["old_secret_hash"]) if row["old_secret_hash"] else None,
        old_secret_until=row["old_secret_until"], created_at=row["created_at"],
        strength_epoch=row["strength_epoch"],
        usage=Accumulator(row["usage_value"], posix(row["usage_at"])),
        last_used_at=row["last_used_at"], expires_at=row["expires_at"],
        revoked_at=row["revoked_at"], requests_per_minute=row["requests_per_minute"],
        token_quota=row["token_quota"], quota_period_seconds=row["quota_period_seconds"],
    )


async def insert_key(db: Executor, record: KeyRecord) -> None:
    await db.execute(
        """
        INSERT INTO api_keys (tenant_id, key_id, scopes, description, state, secret_hash,
            created_at, strength_epoch, usage_value, usage_at, expires_at,
            requests_per_minute, token_quota, quota_period_seconds)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 0, $7, $8, $9, $10, $11)
        """,
        record.tenant_id, record.key_id, list(record.scopes), record.description,
        record.stored_state.value, record.secret_hash, record.created_at, record.expires_at,
        record.requests_per_minute, record.token_quota, record.quota_period_seconds,
    )
    await db.execute(
        "INSERT INTO api_key_quotas (tenant_id, key_id, minute_start, period_start) "
        "VALUES ($1, $2, $3, $3)",
        record.tenant_id, record.key_id, record.created_at,
    )


async def get_key(
    db: Executor, key_id: str, tenant_id: str | None, *, for_update: bool = False
) -> KeyRecord | None:
    row = await db.fetchrow(
        "SELECT * FROM api_keys WHERE key_id = $1 AND ($2::text IS NULL OR tenant_id = $2)"
        + (" FOR UPDATE" if for_update else ""),
        key_id, tenant_id,
    )
    return key_from_row(row) if row else None


async def set_state(
    db: Executor, record: KeyRecord, state: KeyState, now: dt.datetime
) -> KeyRecord:
    row = await db.fetchrow(
        "UPDATE api_keys SET state = $3, revoked_at = CASE WHEN $3 = 'revoked' THEN $4 "
        "ELSE revoked_at END WHERE tenant_id = $1 AND key_id = $2 RETURNING *",
        record.tenant_id, record.key_id, state.value, now,
    )
    assert row is not None  # the caller holds the row lock
    return key_from_row(row)


async def rotate_secret(
    db: Executor, record: KeyRecord, new_hash: bytes, old_until: dt.datetime | None,
    now: dt.datetime,
) -> KeyRecord:
    """Replace the secret, restart strength at K0, forget per-source failures."""
    row = await db.fetchrow(
        """
        UPDATE api_keys SET secret_hash = $3,
            old_secret_hash = CASE WHEN $4::timestamptz IS NULL THEN NULL ELSE secret_hash END,
            old_secret_until = $4, state = 'active', strength_epoch = $5,
            usage_value = 0, usage_at = $5
        WHERE tenant_id = $1 AND key_id = $2 RETURNING *
        """,
        record.tenant_id, record.key_id, new_hash, old_until, now,
    )
    await db.execute(
        "DELETE FROM api_key_sources WHERE tenant_id = $1 AND key_id = $2",
        record.tenant_id, record.key_id,
    )
    assert row is not None
    return key_from_row(row)


async def list_keys(
    db: Executor, tenant_id: str, *, include_revoked: bool, after: tuple[dt.datetime, str] | None,
    limit: int,
) -> list[KeyRecord]:
    rows = await db.fetch(
        """
        SELECT * FROM api_keys WHERE tenant_id = $1 AND ($2 OR state <> 'revoked')
          AND ($3::timestamptz IS NULL OR (created_at, key_id) > ($3, $4))
        ORDER BY created_at, key_id LIMIT $5
        """,
        tenant_id, include_revoked, after[0] if after else None, after[1] if after else "",
        limit,
    )
    return [key_from_row(r) for r in rows]


async def active_keys_page(db: Executor, after_key_id: str, limit: int) -> list[KeyRecord]:
    rows = await db.fetch(
        "SELECT * FROM api_keys WHERE state = 'active' AND key_id > $1 ORDER BY key_id LIMIT $2",
        after_key_id, limit,
    )
    return [key_from_row(r) for r in rows]


async def add_samples(
    db: Executor, samples: Sequence[tuple[str, str, StrengthSample]]
) -> None:
    """Append strength samples: ``(tenant_id, key_id, sample)`` each."""
    if not samples:
        return
    await db.execute(
        """
        INSERT INTO api_key_strength_history (tenant_id, key_id, at, strength, kind, source)
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::float8[],
                             $5::text[], $6::text[])
        """,
        [t for t, _, _ in samples], [k for _, k, _ in samples], [s.at for _, _, s in samples],
        [s.strength for _, _, s in samples], [s.kind.value for _, _, s in samples],
        [s.source for _, _, s in samples],
    )


async def strength_history(
    db: Executor, tenant_id: str, key_id: str, *, before_id: int | None, limit: int
) -> list[tuple[int, StrengthSample]]:
    rows = await db.fetch(
        """
        SELECT id, at, strength, kind, source FROM api_key_strength_history
        WHERE tenant_id = $1 AND key_id = $2 AND ($3::bigint IS NULL OR id < $3)
        ORDER BY id DESC LIMIT $4
        """,
        tenant_id, key_id, before_id, limit,
    )
    return [
        (r["id"], StrengthSample(r["at"], r["strength"], StrengthKind(r["kind"]), r["source"]))
        for r in rows
    ]


async def source_rows(db: Executor, tenant_id: str, key_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM api_key_sources WHERE tenant_id = $1 AND key_id = $2", tenant_id, key_id
    )


async def add_failure(
    db: Executor, record: KeyRecord, source: str, amount: float, now: dt.datetime,
    tau_seconds: float, burst_seconds: float,
) -> asyncpg.Record:
    """Accumulate one failure into F_s and the burst counter, atomically in SQL
    (several processes may count failures for the same source at once)."""
    row = await db.fetchrow(
        """
        INSERT INTO api_key_sources AS s (tenant_id, key_id, source, failure_value, failure_at,
                                          burst_value, burst_at)
        VALUES ($1, $2, $3, $4, $5, 1, $5)
        ON CONFLICT (tenant_id, key_id, source) DO UPDATE SET
            failure_value = s.failure_value
                * exp(-greatest(0, extract(epoch FROM $5 - s.failure_at)) / $6) + $4,
            failure_at = greatest(s.failure_at, $5),
            burst_value = s.burst_value
                * exp(-greatest(0, extract(epoch FROM $5 - s.burst_at)) / $7) + 1,
            burst_at = greatest(s.burst_at, $5)
        RETURNING *
        """,
        record.tenant_id, record.key_id, source, amount, now, tau_seconds, burst_seconds,
    )
    assert row is not None
    return row


async def mark_source_suspended(
    db: Executor, record: KeyRecord, source: str, now: dt.datetime
) -> bool:
    """True if this call is the one that suspended the source (audit it once)."""
    status = await db.execute(
        "UPDATE api_key_sources SET suspended_at = $4 WHERE tenant_id = $1 AND key_id = $2 "
        "AND source = $3 AND suspended_at IS NULL",
        record.tenant_id, record.key_id, source, now,
    )
    return status.endswith(" 1")


async def flush_uses(
    db: Executor, batch: Sequence[tuple[str, str, float, dt.datetime, dt.datetime]],
    tau_seconds: float,
) -> list[asyncpg.Record]:
    """Merge pending uses ``(tenant, key, delta, delta_at, last_used)`` into each key's U."""
    return await db.fetch(
        """
        UPDATE api_keys k SET
            usage_value = k.usage_value
                * exp(-extract(epoch FROM greatest(k.usage_at, u.at) - k.usage_at) / $6)
                + u.delta * exp(-extract(epoch FROM greatest(k.usage_at, u.at) - u.at) / $6),
            usage_at = greatest(k.usage_at, u.at),
            last_used_at = greatest(k.last_used_at, u.last_used)
        FROM unnest($1::text[], $2::text[], $3::float8[], $4::timestamptz[], $5::timestamptz[])
             AS u(tenant_id, key_id, delta, at, last_used)
        WHERE k.tenant_id = u.tenant_id AND k.key_id = u.key_id
        RETURNING k.*
        """,
        [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch],
        [b[3] for b in batch], [b[4] for b in batch], tau_seconds,
    )


async def mark_sources_verified(
    db: Executor, sources: Sequence[tuple[str, str, str]], now: dt.datetime
) -> None:
    if not sources:
        return
    await db.execute(
        """
        INSERT INTO api_key_sources (tenant_id, key_id, source, failure_at, burst_at, verified)
        SELECT t, k, s, $4, $4, true FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, k, s)
        ON CONFLICT (tenant_id, key_id, source) DO UPDATE SET verified = true
        """,
        [s[0] for s in sources], [s[1] for s in sources], [s[2] for s in sources], now,
    )
