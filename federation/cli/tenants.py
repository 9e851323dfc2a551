"""``federation tenants …``: per-tenant settings, for the local operator.

    federation tenants transcripts TENANT on|off [--json]

Runs against the running federation like ``federation vault``: the database from
``FEDERATION_DATABASE_URL`` (or ``endpoints.json``) and thermal memory over mTLS with
the operator's admin identity. Every change is audited (``tenant.settings.update``)
before it commits; if thermal memory cannot record it, nothing changes. A running
gateway sees the change within a few seconds (its read cache).
"""

from __future__ import annotations

import argparse
from typing import Any

from federation.cli.support import print_json
from federation.config import Settings
from federation.db import create_pool
from federation.launch.endpoints import admin_channel, database_url, operator_actor
from federation.memory.client import GrpcAuditSink
from federation.vault.tenants import set_store_transcripts


def register(commands: Any) -> None:
    tenants = commands.add_parser("tenants", help="per-tenant settings")
    sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")

    transcripts = sub.add_parser(
        "transcripts",
        help="store a tenant's chat prompts and completions, encrypted in the vault (on), "
             "or not (off, the default)")
    transcripts.add_argument("tenant", metavar="TENANT")
    transcripts.add_argument("state", choices=("on", "off"))
    transcripts.add_argument("--json", action="store_true")
    transcripts.set_defaults(handler=_transcripts)


async def _transcripts(settings: Settings, args: argparse.Namespace) -> int:
    pool = await create_pool(database_url(settings), settings.database, min_size=1, max_size=2)
    try:
        async with admin_channel(settings, "memory") as channel:
            audit = GrpcAuditSink(channel, timeout_seconds=settings.grpc.call_timeout_seconds)
            result = await set_store_transcripts(
                pool, audit, tenant_id=args.tenant, enabled=args.state == "on",
                actor=operator_actor(settings))
    finally:
        await pool.close()
    if args.json:
        print_json(result.to_json())
    else:
        state = "stored, encrypted" if result.store_transcripts else "not stored"
        print(f"tenant {result.tenant_id}: chat transcripts are {state}")
    return 0
