"""PostgreSQL for a real deployment: an owner that migrates, one login per node role.

``federation db init-roles`` (as a superuser of the cluster, once) does three steps:

1. **as the superuser**: create the owner role (``LOGIN CREATEROLE``) and the
   database it owns; nobody else may connect to it (``REVOKE CONNECT … FROM PUBLIC``);
2. **as the owner**: apply the migrations, which create the NOLOGIN group roles
   (``federation_keys``, ``…_memory``, ``…_guardian``, ``…_broker``, ``…_gateway``)
   and grant each exactly what its node needs (``0020``, ``0021``, ``0022``, ``0030``);
3. **as the superuser**: create one LOGIN role per node role, member of its group role
   only, allowed to connect, with a generated password.

So the least privilege holds at the login: the gateway's login cannot read the
guardian's shares even before any ``SET ROLE``, and cannot ``SET ROLE`` into the
guardian's role either. The owner's ``CREATEROLE`` manages only the roles it created
(PostgreSQL 16 and later; earlier versions let it grant itself any non-superuser
role: use 16+). The same steps as SQL, for a DBA who runs them by hand:
:func:`init_roles_sql`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from federation.db.migrate import apply_migrations

NODE_ROLES: tuple[str, ...] = ("keys", "memory", "guardian", "broker", "gateway")
"""The roles whose processes use PostgreSQL, each with its own login."""


@dataclass(frozen=True)
class RolePlan:
    """The names and passwords ``init-roles`` uses."""

    database: str = "federation"
    owner: str = "federation_owner"
    login_prefix: str = "federation_"
    owner_password: str = ""
    passwords: tuple[tuple[str, str], ...] = ()
    """``(node role, password)`` for each login."""

    @classmethod
    def generate(cls, database: str = "federation", owner: str = "federation_owner",
                 login_prefix: str = "federation_") -> RolePlan:
        return cls(database, owner, login_prefix, secrets.token_urlsafe(24),
                   tuple((role, secrets.token_urlsafe(24)) for role in NODE_ROLES))

    def login(self, role: str) -> str:
        """The LOGIN role of a node role: ``federation_keys_login`` by default."""
        return f"{self.login_prefix}{role}_login"

    @staticmethod
    def group(role: str) -> str:
        """The NOLOGIN role the migrations grant: ``federation_keys``."""
        return f"federation_{role}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def owner_statements(plan: RolePlan) -> list[str]:
    """Step 1, as a superuser: the owner role (if absent), and the group roles with the
    owner a member of each (the migrations run statements as them; on a cluster where an
    earlier federation made them, only a superuser can grant that membership)."""
    owner = _ident(plan.owner)
    statements = [
        f"DO $$ BEGIN CREATE ROLE {owner} LOGIN CREATEROLE; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        f"ALTER ROLE {owner} LOGIN CREATEROLE PASSWORD {_literal(plan.owner_password)}",
    ]
    for role in NODE_ROLES:
        group = _ident(plan.group(role))
        statements += [f"DO $$ BEGIN CREATE ROLE {group} NOLOGIN; "
                       "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                       f"GRANT {group} TO {owner}"]
    return statements


def database_statements(plan: RolePlan) -> list[str]:
    """Step 1 (continued): ``CREATE DATABASE`` cannot run in a DO block, so the caller
    checks whether it exists first."""
    return [f"CREATE DATABASE {_ident(plan.database)} OWNER {_ident(plan.owner)}",
            f"REVOKE ALL ON DATABASE {_ident(plan.database)} FROM PUBLIC"]


def login_statements(plan: RolePlan) -> list[str]:
    """Step 3, as a superuser (after the migrations made the group roles)."""
    statements = [f"GRANT CONNECT ON DATABASE {_ident(plan.database)} TO {_ident(plan.owner)}"]
    for role, password in plan.passwords:
        login = _ident(plan.login(role))
        statements += [
            f"DO $$ BEGIN CREATE ROLE {login} LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            f"ALTER ROLE {login} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
            f"PASSWORD {_literal(password)}",
            f"GRANT {_ident(plan.group(role))} TO {login}",
            f"GRANT CONNECT ON DATABASE {_ident(plan.database)} TO {login}",
        ]
    return statements


def init_roles_sql(plan: RolePlan, owner_url: str) -> str:
    """The three steps as one script for ``psql``, with the migration step between."""
    lines = ["-- federation db init-roles: run the parts in order.",
             "-- 1. As a superuser of the cluster:"]
    lines += [s + ";" for s in owner_statements(plan)]
    lines += [f"-- (only if the database does not exist yet:) {s};"
              for s in database_statements(plan)]
    lines += ["-- 2. As the owner, apply the migrations (they create the group roles):",
              f"--    federation db migrate --database-url '{owner_url}'",
              "-- 3. As a superuser again:"]
    lines += [s + ";" for s in login_statements(plan)]
    return "\n".join(lines) + "\n"


def with_credentials(url: str, user: str, password: str | None, database: str | None
                     ) -> str:
    """``url`` (host, port, query) for another user and database."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = quote(user, safe="")
    if password is not None:
        netloc += ":" + quote(password, safe="")
    netloc += "@" + host + (f":{parts.port}" if parts.port else "")
    path = "/" + database if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, ""))


async def init_roles(admin_url: str, plan: RolePlan) -> list[int]:
    """Run the three steps through ``admin_url`` (a superuser); returns the migrations
    applied now. Idempotent: existing roles get the plan's passwords, nothing else
    changes."""
    admin = await asyncpg.connect(admin_url)
    try:
        for statement in owner_statements(plan):
            await admin.execute(statement)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1",
                                      plan.database)
        if not exists:
            for statement in database_statements(plan):
                await admin.execute(statement)
    finally:
        await admin.close()
    owner = await asyncpg.connect(
        with_credentials(admin_url, plan.owner, plan.owner_password, plan.database))
    try:
        applied = await apply_migrations(owner)
    finally:
        await owner.close()
    admin = await asyncpg.connect(admin_url)
    try:
        for statement in login_statements(plan):
            await admin.execute(statement)
    finally:
        await admin.close()
    return applied


def login_urls(base_url: str, plan: RolePlan, roles: Sequence[str] = NODE_ROLES
               ) -> dict[str, str]:
    """Each node role's DSN, without a password (it goes in a passfile)."""
    return {role: with_credentials(base_url, plan.login(role), None, plan.database)
            for role in roles}


def pgpass_line(url: str, password: str) -> str:
    """One ``.pgpass`` line (``host:port:database:user:password``) for ``url``; asyncpg and
    libpq read it through ``passfile=`` in the DSN, so no password sits in a URL."""
    parts = urlsplit(url)

    def field(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return ":".join(field(v) for v in (parts.hostname or "*", str(parts.port or 5432),
                                       parts.path.lstrip("/") or "*", parts.username or "*",
                                       password)) + "\n"
