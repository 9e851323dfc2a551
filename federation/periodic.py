"""Background work: periodic jobs in one asyncio task with an explicit start and stop,
the one way a background task is stopped, and the one way a task nobody awaits is kept."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


CANCEL_AGAIN_SECONDS = 0.5
"""How long :func:`cancel_and_wait` gives a task to end before cancelling it again."""


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (``None``: nothing to stop) and wait until it has ended. Its
    cancellation is the expected end; any other exception it ended with is raised.

    A task can swallow one cancellation: asyncpg turns a cancel that lands while it
    releases a connection into a TimeoutError, which a retry loop's ``except Exception``
    takes for an outage (a broker's stop then hung during a database stall until it was
    killed). So the task is cancelled again every ``CANCEL_AGAIN_SECONDS`` until it ends."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """:func:`cancel_and_wait` of every task at once; their other exceptions are dropped
    (a stop must stop every task, whatever one of them ended with)."""
    await asyncio.gather(*(cancel_and_wait(t) for t in tasks), return_exceptions=True)


class TaskSet:
    """Tasks started and not awaited where they start, held until they end: the event
    loop keeps only weak references to tasks, so one nobody holds may be collected
    before it is done. An owner that stops waits for them (``wait``) or ends them
    (``cancel``)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T], *, name: str | None = None
              ) -> asyncio.Task[T]:
        """``work`` in a task of its own (with a copy of the current context)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, grace_seconds: float | None = None) -> None:
        """Until the tasks running now have ended, or for at most ``grace_seconds``;
        they go on after it either way (cancelling this wait does not cancel them)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


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
