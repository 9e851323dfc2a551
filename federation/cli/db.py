"""``federation db``: the database's servers, and promoting a standby after a failover
(docs/runbooks/database-failover.md)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from federation.cli.support import print_json
from federation.config import Settings
from federation.db.replication import display, host_dsns, promote, roles
from federation.errors import CommandError
from federation.launch.endpoints import database_url


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
