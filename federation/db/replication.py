"""A primary and its standbys, seen from a DSN: which host is which, and promotion.

The federation follows a failover through a multi-host DSN,
``postgresql://user:pw@primary:5432,standby:5432/federation?target_session_attrs=read-write``:
asyncpg tries the hosts in order and keeps the first that accepts writes, so once a
standby is promoted every pool's next connection (and every database watch's next
probe) lands on it, with no process restarted. This module is what the operator's
``federation db status`` and ``federation db promote`` use (docs/runbooks/database-failover.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from federation.errors import CommandError

SESSION_ATTRS = "target_session_attrs"


def host_dsns(dsn: str) -> list[str]:
    """One DSN per host of a (possibly multi-host) DSN, without ``target_session_attrs``:
    each connects to that host whatever its role."""
    parts = urlsplit(dsn)
    credentials, _, hosts = parts.netloc.rpartition("@")
    if parts.scheme not in ("postgresql", "postgres") or not hosts:
        raise CommandError("not a PostgreSQL URL: expected "
                           "postgresql://USER@HOST[:PORT][,HOST2…]/DATABASE")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != SESSION_ATTRS])
    prefix = f"{credentials}@" if credentials else ""
    return [urlunsplit((parts.scheme, prefix + host, parts.path, query, ""))
            for host in hosts.split(",") if host]


def display(dsn: str) -> str:
    """``host:port`` of a single-host DSN (no credentials)."""
    return urlsplit(dsn).netloc.rpartition("@")[2]


@dataclass
class ServerRole:
    address: str
    role: str
    """``primary``, ``standby`` or ``unreachable``."""
    detail: str = ""
    replicas: list[dict[str, Any]] = field(default_factory=list)
    """On a primary: each streaming standby (name, state, sync_state, replay lag)."""


async def server_role(dsn: str, connect_seconds: float) -> ServerRole:
    try:
        conn = await asyncpg.connect(dsn, timeout=connect_seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return ServerRole(display(dsn), "unreachable", f"{type(exc).__name__}: {exc}"[:200])
    try:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            lag = await conn.fetchval(
                "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())")
            return ServerRole(display(dsn), "standby",
                              f"replay lag {lag:.1f}s" if lag is not None else "")
        rows = await conn.fetch(
            "SELECT application_name, client_addr::text AS client, state, sync_state, "
            "extract(epoch FROM replay_lag) AS replay_lag_seconds FROM pg_stat_replication")
        return ServerRole(display(dsn), "primary", replicas=[dict(r) for r in rows])
    finally:
        await conn.close()


async def roles(dsn: str, connect_seconds: float) -> list[ServerRole]:
    return list(await asyncio.gather(*(server_role(d, connect_seconds) for d in host_dsns(dsn))))


async def promote(dsn: str, connect_seconds: float, *, keep_synchronous: bool = False,
                  wait_seconds: int = 60) -> bool:
    """Promote the standby at ``dsn`` (one host) to primary, as ``pg_ctl promote`` does,
    through SQL (``pg_promote``, PostgreSQL 12+): no shell on the database host needed.
    Refuses a server that is not a standby: promoting is only ever done to a standby.

    A standby copied from a primary with synchronous replication carries its
    ``synchronous_standby_names``: promoted with no standby of its own, every commit
    would wait for ever. Unless ``keep_synchronous``, that setting is cleared (the
    federation writes again at once, on one copy until a new standby is attached);
    returns whether it was."""
    try:
        conn = await asyncpg.connect(dsn, timeout=connect_seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise CommandError(f"cannot reach {display(dsn)}: {exc}") from exc
    try:
        if not await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise CommandError(f"{display(dsn)} is already a primary: nothing to promote")
        if not await conn.fetchval("SELECT pg_promote(true, $1)", wait_seconds):
            raise CommandError(f"{display(dsn)} did not finish promoting within "
                               f"{wait_seconds}s; see its log")
        if keep_synchronous or not await conn.fetchval("SHOW synchronous_standby_names"):
            return False
        await conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        await conn.execute("SELECT pg_reload_conf()")
        return True
    finally:
        await conn.close()
