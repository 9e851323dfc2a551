"""Numbered SQL migrations, applied once each under an advisory lock.

Migrations are the files ``federation/db/migrations/NNNN_name.sql``. Each is
applied in its own transaction and recorded (with a checksum) in
``schema_migrations``; an applied migration whose file later changes is an
error, not something to silently re-run. Concurrent migrators serialise on a
PostgreSQL advisory lock, so two processes starting at once do not collide.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from federation.db.sessions import session_advisory_lock

log = logging.getLogger(__name__)

ADVISORY_LOCK_KEY = 0x46454452_4D494752  # "FEDRMIGR"
_FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("federation.db.migrations").iterdir():
        match = _FILE_PATTERN.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {versions}")
    return found


async def apply_migrations(
    conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
    migrations: list[Migration] | None = None,
) -> list[int]:
    """Apply every pending migration; return the versions applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[int] = []
    async with session_advisory_lock(conn, ADVISORY_LOCK_KEY, wait=True):
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        _warn_if_newer(done, migrations)
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it "
                        "was applied; add a new migration instead of editing an applied one"
                    )
                continue
            await _apply(conn, migration, applied_now)
            applied_now.append(migration.version)
            log.info(
                "applied migration",
                extra={"version": migration.version, "migration": migration.name},
            )
    return applied_now


def _warn_if_newer(done: dict[int, str], migrations: list[Migration]) -> None:
    """A schema migrated by a newer version is taken (a rollback of the code runs on it,
    docs/deploy.md), but said: the operator should know this code does not know it all."""
    known = {m.version for m in migrations}
    unknown = sorted(v for v in done if v not in known)
    if unknown:
        log.warning("the database schema is newer than this code: migrations it does not "
                    "know are applied (a rollback? run the newer version if not)",
                    extra={"unknown_versions": ",".join(f"{v:04d}" for v in unknown)})


async def _apply(conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any], migration: Migration,
                 applied_now: list[int]) -> None:
    """One migration and its record, in one transaction. A statement that fails is one
    error naming the migration and what is applied, not PostgreSQL's bare message (a
    traceback at the command line): the operator must know where the schema stands."""
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.InsufficientPrivilegeError:
        raise  # `federation db migrate` says to run it as the owner
    except asyncpg.PostgresError as exc:
        now = f"; {len(applied_now)} before it applied now" if applied_now else ""
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name} failed and was rolled back, "
            f"so the schema stands just before it{now}: {type(exc).__name__}: {exc}"
        ) from exc


async def check_schema(conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
                       migrations: list[Migration] | None = None) -> None:
    """Refuse a schema older than this code (or changed under it), for a process that
    may not migrate it (a node logging in as its own least-privilege role)."""
    migrations = load_migrations() if migrations is None else migrations
    try:
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        rows = []
    done = {r["version"]: r["checksum"] for r in rows}
    missing = [f"{m.version:04d}_{m.name}" for m in migrations if m.version not in done]
    if missing:
        raise MigrationError(
            f"the database schema lacks migration(s) {', '.join(missing)}: run `federation "
            "db migrate` as the database owner before starting this version")
    _warn_if_newer(done, migrations)
    changed = [f"{m.version:04d}_{m.name}" for m in migrations
               if done[m.version] != m.checksum]
    if changed:
        raise MigrationError(f"migration(s) {', '.join(changed)} differ from what was applied")
