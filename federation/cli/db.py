"""``federation db …``: the database of a deployment.

    federation db migrate [--database-url URL]
    federation db init-roles --admin-url URL --out DIR [--database D] [--owner O]
                             [--login-prefix P] [--print-sql]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import asyncpg

from federation.cli.support import print_json
from federation.config import Settings
from federation.db.migrate import apply_migrations
from federation.db.roles import (
    NODE_ROLES,
    RolePlan,
    init_roles,
    init_roles_sql,
    login_urls,
    pgpass_line,
    with_credentials,
)
from federation.errors import CommandError
from federation.launch.endpoints import database_url
from federation.pki import write_private_file


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="the database: migrations and per-node logins")
    sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    migrate = sub.add_parser("migrate", help="apply pending migrations as the database owner")
    migrate.add_argument("--database-url", help="the owner's DSN (default: "
                         "FEDERATION_DATABASE_URL, else the running federation's)")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(handler=_migrate)
    roles = sub.add_parser("init-roles", help="create the owner, the database and one "
                           "least-privilege login per node role (as a superuser)")
    roles.add_argument("--admin-url", required=True, help="a superuser's DSN on the cluster")
    roles.add_argument("--database", default="federation")
    roles.add_argument("--owner", default="federation_owner")
    roles.add_argument("--login-prefix", default="federation_",
                       help="logins are PREFIX<role>_login")
    roles.add_argument("--out", help="directory for the pgpass files (0600), one per login")
    roles.add_argument("--print-sql", action="store_true",
                       help="print the SQL for a DBA instead of running it")
    roles.add_argument("--json", action="store_true")
    roles.set_defaults(handler=_init_roles)


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    url = args.database_url or database_url(settings)
    try:
        conn = await asyncpg.connect(url, timeout=settings.database.connect_timeout_seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise CommandError(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        applied = await apply_migrations(conn)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise CommandError(f"{exc}: run migrations as the database owner") from None
    finally:
        await conn.close()
    if args.json:
        print_json({"applied": applied})
    else:
        print(f"schema up to date ({len(applied)} migrations applied now)")
    return 0


async def _init_roles(settings: Settings, args: argparse.Namespace) -> int:
    plan = RolePlan.generate(args.database, args.owner, args.login_prefix)
    owner_url = with_credentials(args.admin_url, plan.owner, None, plan.database)
    if args.print_sql:
        print(init_roles_sql(plan, owner_url), end="")
        return 0
    if not args.out:
        raise CommandError("--out DIR is needed: the logins' passwords are written there")
    out = Path(args.out)
    applied = await init_roles(args.admin_url, plan)
    write_private_file(out / "owner.pgpass", pgpass_line(owner_url, plan.owner_password).encode())
    urls = login_urls(args.admin_url, plan)
    for role, password in plan.passwords:
        write_private_file(out / f"{role}.pgpass", pgpass_line(urls[role], password).encode())
    if args.json:
        print_json({"owner": owner_url, "logins": urls, "migrations_applied": applied,
                    "pgpass_dir": str(out.resolve())})
    else:
        print(f"owner {plan.owner} and database {plan.database} ready; "
              f"{len(applied)} migrations applied now")
        for role in NODE_ROLES:
            print(f"  {role:<9} {urls[role]}  (password in {out / (role + '.pgpass')})")
        print("Give each node its DSN with `passfile=` naming its pgpass file, and "
              "`sslmode=verify-full&sslrootcert=…/pki/ca.pem` (docs/deploy.md).")
    return 0
