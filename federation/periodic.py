"""Periodic background work: one asyncio task with an explicit start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PeriodicTask:
    """Runs ``work`` every ``interval`` seconds in one asyncio task.

    ``start()`` creates the task; ``stop()`` cancels and awaits it. A failing
    run is logged and the next one still happens.
    """

    def __init__(self, name: str, interval: float, work: Callable[[], Awaitable[object]]) -> None:
        if interval <= 0:
            raise ValueError(f"{name}: interval must be positive, got {interval}")
        self._name = name
        self._interval = interval
        self._work = work
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._work()
            except Exception:
                log.exception("periodic job failed", extra={"job": self._name})
