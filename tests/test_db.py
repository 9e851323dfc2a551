"""Migrations against a real PostgreSQL: idempotent, safe under concurrency."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from federation.db.migrate import Migration, MigrationError, apply_migrations, load_migrations
from tests.db_support import started_database


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [
            r["version"]
            for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        ]
    finally:
        await conn.close()


async def _schema_snapshot(url: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        )
        return [(r[0], r[1], r[2]) for r in rows]
    finally:
        await conn.close()


async def test_pg_variables_of_the_shell_do_not_reach_the_embedded_server(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg and libpq fill what a DSN leaves out from PG* variables: a developer's
    # PGSSLMODE=require, meant for another server, failed every connection of `make run`
    # ("rejected SSL upgrade"), and PGTARGETSESSIONATTRS=standby found no server.
    if os.environ.get("FEDERATION_TEST_DATABASE_URL"):
        pytest.skip("the external test database's DSN is the user's own")
    monkeypatch.setenv("PGSSLMODE", "require")
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "standby")
    async with started_database(pg_url) as database:
        assert await database.pool.fetchval("SELECT 1") == 1


async def test_migrations_applied_twice_change_nothing(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        first = await apply_migrations(conn)
        snapshot = await _schema_snapshot(pg_url)
        meta = await conn.fetch("SELECT * FROM federation_meta ORDER BY key")
        second = await apply_migrations(conn)
        assert first == [m.version for m in load_migrations()]
        assert second == []
        assert await _schema_snapshot(pg_url) == snapshot
        assert await conn.fetch("SELECT * FROM federation_meta ORDER BY key") == meta
    finally:
        await conn.close()


async def test_concurrent_migrators_do_not_collide(pg_url: str) -> None:
    async def migrate() -> list[int]:
        conn = await asyncpg.connect(pg_url)
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()

    results = await asyncio.gather(*(migrate() for _ in range(4)))
    expected = [m.version for m in load_migrations()]
    # Exactly one migrator applied everything; the others found nothing to do.
    assert sorted(results, key=len) == [[], [], [], expected]
    assert await _versions(pg_url) == expected


async def test_edited_applied_migration_is_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        original = Migration(9001, "probe", "CREATE TABLE probe (id int)")
        await apply_migrations(conn, [original])
        edited = Migration(9001, "probe", "CREATE TABLE probe (id bigint)")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, [edited])
    finally:
        await conn.close()
