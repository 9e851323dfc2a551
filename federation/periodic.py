"""Background work: periodic jobs in one asyncio task with an explicit start and stop,
and the one way a background task is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (``None``: nothing to stop) and wait until it has ended. Its
    cancellation is the expected end; any other exception it ended with is raised."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._work()
            except Exception:
                log.exception("periodic job failed", extra={"job": self._name})
