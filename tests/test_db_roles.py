"""``federation db init-roles``: an owner that migrates, one least-privilege login per node.

Everything here connects with the real logins ``init_roles`` creates on the test
cluster, and runs the real domain code (thermal memory, the key authority, guardian
custody, the vault's gateway pool) as each node would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from federation.config import DatabaseConfig, GuardianConfig, KeysConfig, MemoryConfig
from federation.db import Database
from federation.db.migrate import MigrationError, load_migrations
from federation.db.roles import NODE_ROLES, RolePlan, init_roles, init_roles_sql, login_urls
from federation.guardian.custody import GuardianCustody
from federation.keys.authority import KeyAuthority
from federation.keys.models import IssueRequest
from federation.memory import AuditEntry
from federation.memory.store import MemoryStore
from federation.vault.service import create_gateway_pool

CONFIG = DatabaseConfig(pool_min_size=1, pool_max_size=4)


@pytest.fixture
async def plan(pg_admin_url: str) -> AsyncIterator[RolePlan]:
    """Roles made by ``init_roles`` under names of this test's own (roles are cluster-wide),
    dropped afterwards with their database."""
    tag = "t" + uuid.uuid4().hex[:10]
    plan = RolePlan.generate(database=f"{tag}_db", owner=f"{tag}_owner",
                             login_prefix=f"{tag}_")
    await init_roles(pg_admin_url, plan)
    try:
        yield plan
    finally:
        admin = await asyncpg.connect(pg_admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{plan.database}" WITH (FORCE)')
            for role in NODE_ROLES:
                await admin.execute(f'DROP ROLE IF EXISTS "{plan.login(role)}"')
            await admin.execute(f'REASSIGN OWNED BY "{plan.owner}" TO CURRENT_USER')
            await admin.execute(f'DROP OWNED BY "{plan.owner}"')
            await admin.execute(f'DROP ROLE IF EXISTS "{plan.owner}"')
        finally:
            await admin.close()


def _url(pg_admin_url: str, plan: RolePlan, role: str) -> str:
    password = dict(plan.passwords)[role]
    base = login_urls(pg_admin_url, plan)[role]
    return base.replace("@", f":{password}@", 1)


@contextlib.asynccontextmanager
async def connected(pg_admin_url: str, plan: RolePlan, role: str
                    ) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(_url(pg_admin_url, plan, role))
    try:
        yield conn
    finally:
        await conn.close()


async def _denied(conn: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute(statement)


async def test_the_gateway_login_cannot_reach_guardian_shares(
        pg_admin_url: str, plan: RolePlan) -> None:
    """At the login itself, not only after a SET ROLE: no privilege on the schema, and no
    membership that would let it become the guardian."""
    async with connected(pg_admin_url, plan, "gateway") as conn:
        await _denied(conn, "SELECT count(*) FROM guardian.shares")
        await _denied(conn, "SET ROLE federation_guardian")
        await _denied(conn, "SELECT count(*) FROM memory_records")
        await _denied(conn, "SELECT count(*) FROM api_keys")
        assert await conn.fetchval("SELECT count(*) FROM vault_secrets") == 0
    async with connected(pg_admin_url, plan, "guardian") as conn:
        assert await conn.fetchval("SELECT count(*) FROM guardian.shares") == 0
        await _denied(conn, "SELECT count(*) FROM vault_secrets")


async def test_each_login_reaches_its_own_tables_only(pg_admin_url: str, plan: RolePlan) -> None:
    async with connected(pg_admin_url, plan, "keys") as conn:
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
        await _denied(conn, "SELECT count(*) FROM memory_records")
        await _denied(conn, "SELECT count(*) FROM edge_jobs")
        await _denied(conn, "CREATE TABLE sneaky (x int)")
    async with connected(pg_admin_url, plan, "memory") as conn:
        await _denied(conn, "DELETE FROM memory_records")
        await _denied(conn, "SELECT count(*) FROM api_keys")
        await _denied(conn, "SELECT count(*) FROM guardian.shares")
    async with connected(pg_admin_url, plan, "broker") as conn:
        assert await conn.fetchval("SELECT count(*) FROM edge_jobs") == 0
        await _denied(conn, "SELECT count(*) FROM api_keys")


async def test_a_login_without_a_grant_cannot_connect(pg_admin_url: str, plan: RolePlan
                                                      ) -> None:
    stranger = f"{plan.login_prefix}stranger"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f"CREATE ROLE \"{stranger}\" LOGIN PASSWORD 'pw'")
        url = login_urls(pg_admin_url, plan, ("x",))["x"].replace(
            plan.login("x"), f"{stranger}:pw")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncpg.connect(url)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{stranger}"')
        await admin.close()


async def test_the_real_services_run_as_their_logins(
        pg_admin_url: str, plan: RolePlan, tmp_path: object) -> None:
    memory_db = Database(_url(pg_admin_url, plan, "memory"), CONFIG, migrate=False)
    keys_db = Database(_url(pg_admin_url, plan, "keys"), CONFIG, migrate=False)
    guardian_db = Database(_url(pg_admin_url, plan, "guardian"), CONFIG, migrate=False)
    async with contextlib.AsyncExitStack() as stack:
        for db in (memory_db, keys_db, guardian_db):
            await db.start()
            stack.push_async_callback(db.stop)
        store = MemoryStore(memory_db.pool, MemoryConfig())
        await store.start()
        stack.push_async_callback(store.stop)
        record = await store.record(AuditEntry(actor="test", action="roles.check"))
        assert record.sequence >= 1
        authority = KeyAuthority(keys_db.pool, KeysConfig(), store)
        issued = await authority.issue(IssueRequest("acme", ["chat"]), actor="admin")
        assert issued.view.record.tenant_id == "acme"
        custody = GuardianCustody(guardian_db.pool, b"k" * 32, store, GuardianConfig())
        assert list((await custody.list("acme")).shares) == []
        gateway = await create_gateway_pool(_url(pg_admin_url, plan, "gateway"), CONFIG)
        try:
            assert await gateway.fetchval("SELECT count(*) FROM vault_secrets") == 0
        finally:
            await gateway.close()


async def test_a_node_that_may_not_migrate_refuses_an_old_schema(pg_url: str) -> None:
    database = Database(pg_url, CONFIG, migrate=False)  # an empty database: no migrations
    with pytest.raises(MigrationError, match="run `federation db migrate`"):
        await database.start()


def test_the_sql_for_a_dba_runs_the_three_steps_in_order() -> None:
    plan = RolePlan.generate()
    sql = init_roles_sql(plan, "postgresql://federation_owner@db1:5432/federation")
    owner = sql.index('CREATE ROLE "federation_owner" LOGIN CREATEROLE')
    migrate = sql.index("federation db migrate --database-url")
    logins = sql.index('GRANT "federation_gateway" TO "federation_gateway_login"')
    assert owner < migrate < logins
    assert 'REVOKE ALL ON DATABASE "federation" FROM PUBLIC' in sql


async def test_the_migrate_command_applies_pending_migrations_once(pg_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    argv = [sys.executable, "-m", "federation.cli", "db", "migrate", "--database-url", pg_url,
            "--json"]
    runs = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        runs.append(json.loads(out)["applied"])
    assert runs[0] == [m.version for m in load_migrations()] and runs[1] == []
