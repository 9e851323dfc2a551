"""Can a *new* connection to the gateway's database be made now? For ``GET /health``.

The database watch (``federation.db.DatabaseWatch``) probes on a connection it keeps
open: with only the postmaster frozen (SIGSTOP), sessions already open keep answering
while every new connection hangs, so the watch sees nothing wrong, though the pool can no
longer grow or replace a connection, and ``federation status`` (which connects anew)
reports the database unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from federation.periodic import cancel_and_wait

log = logging.getLogger(__name__)


class NewConnectionProbe:
    """Whether a new connection to the database can be made now: connect (TCP, TLS,
    authentication, up to the backend's first answer) within ``timeout_seconds``, then
    close. The answer is reused for ``cache_seconds``, and callers that arrive while a
    probe runs wait for that one, so ``/health``, which anyone may call, opens at most one
    connection per interval and costs nothing more the rest of the time.
    """

    def __init__(self, url: str, timeout_seconds: float, cache_seconds: float) -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._cache = cache_seconds
        self._answer: tuple[float, bool] | None = None
        """(when, possible) of the last probe."""
        self._running: asyncio.Task[bool] | None = None

    async def possible(self) -> bool:
        if self._answer is not None and time.monotonic() - self._answer[0] < self._cache:
            return self._answer[1]
        if self._running is None:
            self._running = asyncio.create_task(self._probe())
        # Shielded: a caller of /health that goes away does not cancel the others' probe.
        return await asyncio.shield(self._running)

    async def stop(self) -> None:
        await cancel_and_wait(self._running)

    async def _probe(self) -> bool:
        try:
            possible = await self._connect()
            self._answer = (time.monotonic(), possible)
            return possible
        finally:
            self._running = None

    async def _connect(self) -> bool:
        try:
            connection = await asyncpg.connect(self._url, timeout=self._timeout)
        except Exception as exc:  # any failure means "not now"
            log.debug("new database connection failed", extra={"error": str(exc)[:200]})
            return False
        try:
            await connection.close(timeout=self._timeout)
        except Exception:  # it was made, which is what was asked
            connection.terminate()
        return True
