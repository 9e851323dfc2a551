"""``federation vault``: the tenant vault, for the local operator.

The commands run the vault domain directly, as the gateway does, against the
running federation: the database from ``endpoints.json`` (or
``FEDERATION_DATABASE_URL``), the gateway wrapping key from the home, and the
guardian and thermal memory over mTLS with the operator's admin identity. So
they need the federation home, not an API key; every action is audited with the
operator's SPIFFE id as the actor. Tenants' own clients use the HTTP API.

    federation vault put --tenant T NAME        (value from stdin)
    federation vault get ID < SHARE_FILE        (prints the value; the client share on
                                                stdin, or typed at a prompt)
    federation vault recover ID --reason R      (prints a new client share)
    federation vault rotate ID < SHARE_FILE
    federation vault list --tenant T
    federation vault destroy ID --reason R
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from federation.cli.support import all_pages, print_json
from federation.config import Settings
from federation.crypto.keyfile import load_or_create_key
from federation.guardian.client import GrpcGuardianClient
from federation.launch.endpoints import admin_channel, database_url, operator_actor
from federation.memory.client import GrpcAuditSink
from federation.vault.records import IssuedShare, SecretInfo
from federation.vault.service import VaultService, create_gateway_pool

SHARE_FROM_STDIN = "-"
_SHARE_HELP_STDIN = ("by default (or '-') read from standard input, which keeps it out of "
                     "the process list and the shell's history")
_SHARE_HELP = "the client share (fedshare_...); " + _SHARE_HELP_STDIN


def register(commands: Any) -> None:
    vault = commands.add_parser("vault", help="tenant secrets no single node can open")
    sub = vault.add_subparsers(dest="vault_command", required=True, metavar="ACTION")

    put = sub.add_parser("put", help="store a secret (value read from stdin)")
    put.add_argument("--tenant", required=True)
    put.add_argument("name")
    put.add_argument("--json", action="store_true")
    put.set_defaults(handler=_put)

    get = sub.add_parser("get", help="print a secret's value (needs its client share)")
    get.add_argument("id")
    get.add_argument("--share", default=SHARE_FROM_STDIN, help=_SHARE_HELP)
    get.add_argument("--json", action="store_true")
    get.set_defaults(handler=_get)

    recover = sub.add_parser(
        "recover", help="open with the gateway + guardian shares, issue a new client share")
    recover.add_argument("id")
    recover.add_argument("--reason", required=True)
    recover.add_argument("--json", action="store_true")
    recover.set_defaults(handler=_recover)

    rotate = sub.add_parser("rotate", help="re-encrypt under a new key, issue new shares")
    rotate.add_argument("id")
    rotate.add_argument("--share", default=SHARE_FROM_STDIN,
                        help="the current client share; " + _SHARE_HELP_STDIN)
    rotate.add_argument("--json", action="store_true")
    rotate.set_defaults(handler=_rotate)

    listing = sub.add_parser("list", help="a tenant's secrets (metadata only)")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)

    destroy = sub.add_parser("destroy", help="crypto-shred a secret (irreversible)")
    destroy.add_argument("id")
    destroy.add_argument("--reason", default="destroyed by the operator")
    destroy.add_argument("--json", action="store_true")
    destroy.set_defaults(handler=_destroy)


@contextlib.asynccontextmanager
async def open_vault(settings: Settings) -> AsyncIterator[VaultService]:
    async with contextlib.AsyncExitStack() as stack:
        pool = await create_gateway_pool(database_url(settings), settings.database)
        stack.push_async_callback(pool.close)
        guardian = admin_channel(settings, "guardian")
        stack.push_async_callback(guardian.close)
        memory = admin_channel(settings, "memory")
        stack.push_async_callback(memory.close)
        config = settings.vault
        yield VaultService(
            pool, load_or_create_key(settings.home / config.wrapping_key_file),
            GrpcGuardianClient(guardian, config.guardian_timeout_seconds),
            GrpcAuditSink(memory, timeout_seconds=settings.grpc.call_timeout_seconds), config,
            pool_is_gateway_role=True,
        )


def _issued(issued: IssuedShare, args: argparse.Namespace) -> int:
    if args.json:
        print_json({**issued.info.to_json(), "client_share": issued.client_share})
    else:
        print(f"{issued.info.id}  {issued.info.name}  version {issued.info.version}")
        print(issued.client_share)
        print("store the client share now: the federation does not keep it", file=sys.stderr)
    return 0


async def _put(settings: Settings, args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read()
    if value.endswith(b"\n") and sys.stdin.isatty():
        value = value[:-1]
    async with open_vault(settings) as vault:
        issued = await vault.create(tenant_id=args.tenant, name=args.name, value=value,
                                    actor=operator_actor(settings))
    return _issued(issued, args)


def _client_share(args: argparse.Namespace) -> str:
    """The client share: ``--share`` as given, or (``-``, the default) from standard input.
    A command line is readable by every local user (``/proc/PID/cmdline``, ``ps``) and is
    kept in shell history; standard input is neither."""
    if args.share != SHARE_FROM_STDIN:
        return str(args.share)
    if sys.stdin.isatty():
        return getpass.getpass("client share: ")
    return sys.stdin.readline().strip()


async def _get(settings: Settings, args: argparse.Namespace) -> int:
    share = _client_share(args)
    async with open_vault(settings) as vault:
        info, value = await vault.read(tenant_id=None, secret_id=args.id,
                                       client_share=share, actor=operator_actor(settings))
    if args.json:
        print_json({**info.to_json(), "value": value.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(value)
        sys.stdout.flush()
    return 0


async def _recover(settings: Settings, args: argparse.Namespace) -> int:
    async with open_vault(settings) as vault:
        issued = await vault.recover(tenant_id=None, secret_id=args.id,
                                     requested_by_key_id=operator_actor(settings),
                                     reason=args.reason)
    return _issued(issued, args)


async def _rotate(settings: Settings, args: argparse.Namespace) -> int:
    share = _client_share(args)
    async with open_vault(settings) as vault:
        issued = await vault.rotate(tenant_id=None, secret_id=args.id, client_share=share,
                                    actor=operator_actor(settings))
    return _issued(issued, args)


async def _list(settings: Settings, args: argparse.Namespace) -> int:
    async with open_vault(settings) as vault:
        async def fetch(token: str) -> tuple[Sequence[SecretInfo], str]:
            page = await vault.list(args.tenant, 1000, token)
            return page.secrets, page.next_page_token

        infos = await all_pages(fetch)
    if args.json:
        print_json([i.to_json() for i in infos])
    else:
        for info in infos:
            print(f"{info.id}  {info.state:<9}  v{info.version}  {info.name}")
    return 0


async def _destroy(settings: Settings, args: argparse.Namespace) -> int:
    async with open_vault(settings) as vault:
        info = await vault.destroy(tenant_id=None, secret_id=args.id, reason=args.reason,
                                   actor=operator_actor(settings))
    if args.json:
        print_json(info.to_json())
    else:
        print(f"{info.id} destroyed: no share can open it any more")
    return 0
