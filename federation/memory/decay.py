"""Periodic background work (a small helper) and the temperature decay job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from federation.memory.store import MemoryStore

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


def temperature_decay_job(store: MemoryStore, interval: float) -> PeriodicTask:
    """Cool every record by the configured amount and compress what went cold."""
    return PeriodicTask("thermal-memory-decay", interval, store.cool)
