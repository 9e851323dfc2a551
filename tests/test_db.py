"""Migrations against a real PostgreSQL: idempotent, safe under concurrency."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from federation.db.migrate import (
    Migration,
    MigrationError,
    apply_migrations,
    check_schema,
    load_migrations,
)
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


async def test_a_schema_newer_than_the_code_is_taken_and_said(
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        newer = [Migration(9001, "one", "CREATE TABLE one (id int)"),
                 Migration(9002, "two", "CREATE TABLE two (id int)")]
        await apply_migrations(conn, newer)
        with caplog.at_level("WARNING", logger="federation.db.migrate"):
            assert await apply_migrations(conn, newer[:1]) == []  # the older code
            await check_schema(conn, newer[:1])
        warnings = [r for r in caplog.records if "newer than this code" in r.getMessage()]
        assert [getattr(r, "unknown_versions", "") for r in warnings] == ["9002", "9002"]
    finally:
        await conn.close()


async def _migrate_command(url: str, home: Path) -> tuple[int, str]:
    """``federation db migrate --database-url URL``: (exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "--home", str(home), "db", "migrate",
        "--database-url", url, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_a_migration_that_fails_is_rolled_back_and_named_in_one_line(
        pg_url: str, tmp_path: Path) -> None:
    # A table in the way of 0003's second one: its first statement runs, then it fails.
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE TABLE api_key_sources (id int)")
    finally:
        await conn.close()
    code, err = await _migrate_command(pg_url, tmp_path)
    assert code == 1, err
    assert "Traceback" not in err, err
    assert err.splitlines() == [
        "federation: error: migration 0003_api_keys failed and was rolled back, so the "
        "schema stands just before it; 2 before it applied now: DuplicateTableError: "
        'relation "api_key_sources" already exists'], err
    assert await _versions(pg_url) == [1, 2]
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('api_keys')") is None  # rolled back
        await conn.execute("DROP TABLE api_key_sources")
    finally:
        await conn.close()
    code, err = await _migrate_command(pg_url, tmp_path)
    assert code == 0, err
    assert await _versions(pg_url) == [m.version for m in load_migrations()]
