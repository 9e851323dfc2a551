"""Session state on pooled connections: only what ends with certainty.

Pools do not reset a connection on release (see :mod:`federation.db`), so a
session advisory lock must never go back to the pool still held.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any


@contextlib.asynccontextmanager
async def session_advisory_lock(conn: Any, key: int, *, wait: bool = False
                                ) -> AsyncIterator[bool]:
    """The session advisory lock ``key`` on ``conn``: waits for it (``wait``) or tries
    once; yields whether it is held, and releases it at the end. When the unlock does
    not complete (cancelled, connection lost), the connection is terminated: its
    session ends, and the lock with it."""
    if wait:
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        yield False
        return
    try:
        yield True
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        except BaseException:
            conn.terminate()
            raise
