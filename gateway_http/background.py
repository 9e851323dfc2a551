"""Background work of the gateway's requests, tracked so shutdown can wait for it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from federation.periodic import TaskSet

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Work that must not delay the response (audit, post-charge) but must not be lost
    at shutdown: tracked here and awaited by ``drain``."""

    def __init__(self) -> None:
        self._tasks = TaskSet()
        self.failures = 0

    def spawn(self, coro: Coroutine[Any, Any, None], what: str,
              on_failure: Callable[[], None] | None = None) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                self.failures += 1
                if on_failure is not None:
                    on_failure()
                log.warning("background %s failed", what, extra={"error": str(exc)[:200]})

        self._tasks.spawn(guarded())  # copies the context: request id included

    async def drain(self, grace_seconds: float = 5.0) -> None:
        await self._tasks.wait(grace_seconds)
