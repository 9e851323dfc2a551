"""``federation db``: the database's servers, promoting a standby after a failover
(docs/runbooks/database-failover.md), migrations as the owner and the per-node logins
of a deployment (docs/deploy.md).

    federation db status|promote …
    federation db migrate [--database-url URL]
    federation db init-roles --admin-url URL --out DIR [--database D] [--owner O]
                             [--login-prefix P] [--print-sql]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import asyncpg

from federation.cli.support import print_json
from federation.config import Settings
from federation.db import connect
from federation.db.migrate import apply_migrations
from federation.db.replication import display, host_dsns, promote, roles
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


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    db = subparsers.add_parser("db", help="the database's servers: roles, promotion")
    commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status", help="each host of the DSN: primary, standby or unreachable, and the "
                       "primary's standbys (non-zero unless exactly one primary)")
    status.add_argument("--url", help="DSN to inspect (default: the federation's)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=show_roles)
    promote_cmd = commands.add_parser(
        "promote", help="promote a standby to primary (after the primary is lost)")
    promote_cmd.add_argument("--url", help="DSN of the standby to promote; with a multi-host "
                                          "DSN, the one standby among its hosts")
    promote_cmd.add_argument(
        "--keep-synchronous", action="store_true",
        help="keep synchronous_standby_names: writes then wait until a new standby attaches")
    promote_cmd.add_argument("--json", action="store_true")
    promote_cmd.set_defaults(handler=promote_standby)
    _register_deployment(commands)


def _register_deployment(commands: Any) -> None:
    migrate = commands.add_parser("migrate", help="apply pending migrations as the owner")
    migrate.add_argument("--database-url", help="the owner's DSN (default: "
                         "FEDERATION_DATABASE_URL, else the running federation's)")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(handler=_migrate)
    init = commands.add_parser("init-roles", help="create the owner, the database and one "
                               "least-privilege login per node role (as a superuser)")
    init.add_argument("--admin-url", required=True, help="a superuser's DSN on the cluster")
    init.add_argument("--database", default="federation")
    init.add_argument("--owner", default="federation_owner")
    init.add_argument("--login-prefix", default="federation_",
                      help="logins are PREFIX<role>_login")
    init.add_argument("--out", help="directory for the pgpass files (0600), one per login")
    init.add_argument("--print-sql", action="store_true",
                      help="print the SQL for a DBA instead of running it")
    init.add_argument("--json", action="store_true")
    init.set_defaults(handler=_init_roles)


async def show_roles(settings: Settings, args: argparse.Namespace) -> int:
    found = await roles(args.url or database_url(settings),
                        settings.database.connect_timeout_seconds)
    primaries = sum(1 for r in found if r.role == "primary")
    if args.json:
        print_json([asdict(r) for r in found])
    else:
        for server in found:
            print(f"{server.address:<24} {server.role:<12} {server.detail}")
            for replica in server.replicas:
                print(f"{'':<24} └ {replica['application_name']} ({replica['client']}): "
                      f"{replica['state']}, {replica['sync_state']}, replay lag "
                      f"{replica['replay_lag_seconds'] or 0:.1f}s")
        print(f"{primaries} primary among {len(found)} hosts")
    return 0 if primaries == 1 else 1


async def promote_standby(settings: Settings, args: argparse.Namespace) -> int:
    timeout = settings.database.connect_timeout_seconds
    url = args.url or database_url(settings)
    candidates = host_dsns(url)
    if len(candidates) > 1:
        standbys = [r for r in await roles(url, timeout) if r.role == "standby"]
        if len(standbys) != 1:
            raise CommandError(f"{len(standbys)} standbys among {len(candidates)} hosts: name "
                               "the one to promote with --url")
        candidates = [d for d in candidates if display(d) == standbys[0].address]
    promoted = display(candidates[0])
    cleared = await promote(candidates[0], timeout, keep_synchronous=args.keep_synchronous)
    if args.json:
        print_json({"promoted": promoted, "synchronous_replication_cleared": cleared})
        return 0
    print(f"promoted {promoted}: it is the primary now; the federation's pools reconnect to "
          "it through the multi-host DSN")
    if cleared:
        print(f"synchronous replication turned off on {promoted} (it has no standby): "
              "committed records now live on one server until you attach a new standby "
              "(docs/runbooks/database-failover.md)")
    return 0


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    url = args.database_url or database_url(settings)
    conn = await connect(url, settings.database)
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
