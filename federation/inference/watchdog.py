"""The inference node's watchdog: a node whose generations stop producing tokens is
wedged, and a wedged node leaves.

The rule is node-wide: while at least one generation is open, some token (or the
end of some generation) must come out every ``stall_timeout_seconds``. A request
waiting for the model behind a running one is not stalled, since the running one
produces tokens; when the running one hangs (a GPU kernel that never returns, a
driver call stuck in the kernel), nothing anywhere on the node moves, and that is
what is detected.

What a wedged node does, in order:

1. reports NOT_SERVING on gRPC health, and refuses new generations (UNAVAILABLE),
   so routers stop sending work here (the gateway's re-probes every 2 s; an
   UNAVAILABLE mid-stream marks the node unhealthy at once);
2. ends every open stream with UNAVAILABLE ("the generation stalled…"): their clients
   get an error event instead of waiting for ever; a generation that had produced
   nothing yet is retried by the router on another node;
3. after ``stall_exit_after_seconds`` (time for those errors and the health change to
   reach callers), exits the process with status :data:`EXIT_WEDGED` so that its
   supervisor (``federation up``, or systemd's ``Restart=on-failure``) starts a fresh
   one.

Why exit, and why ``os._exit`` from a thread: the stuck work is a native call in a
worker thread (llama.cpp's generation runs in one). Python cannot interrupt or
cancel a thread blocked in native code, and a normal exit (``sys.exit``, or the
graceful stop of SIGTERM) waits for it: the backend's stop joins its executor, and
interpreter shutdown joins every non-daemon thread, so the process would never end.
Only ending the process frees the device (and its memory) for a fresh start. The
exit runs on a timer thread, so it happens even if the wedge also blocks the event
loop. Logs are flushed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter

from federation.errors import ErrorCode, FederationError
from federation.periodic import PeriodicTask

log = logging.getLogger(__name__)

EXIT_WEDGED: Final = 75
"""The exit status of a wedged node (EX_TEMPFAIL: "try again"), in the supervisor's
report and ``federation status`` as "exit status 75"."""

Fail = Callable[[Exception], None]


def exit_wedged() -> None:
    """End the process now, as a wedged node must (see the module docstring)."""
    log.critical("exiting: the node is wedged; its supervisor restarts it",
                 extra={"exit_status": EXIT_WEDGED})
    logging.shutdown()
    os._exit(EXIT_WEDGED)


class StallWatchdog:
    """Watches the open generations of one node; ``start()``/``stop()``.

    ``on_wedged`` reports the node NOT_SERVING; ``exit_process`` ends it (tests of
    this class pass their own).
    """

    def __init__(self, stall_seconds: float, exit_after_seconds: float,
                 on_wedged: Callable[[], Awaitable[None]], *,
                 registry: CollectorRegistry | None = None,
                 exit_process: Callable[[], None] = exit_wedged,
                 clock: Callable[[], float] = time.monotonic,
                 count_file: Path | None = None) -> None:
        self._stall = stall_seconds
        self._exit_after = exit_after_seconds
        self._on_wedged = on_wedged
        self._exit_process = exit_process
        self._clock = clock
        self._open: dict[int, Fail] = {}
        self._ids = iter(range(1 << 62))
        self._last_progress = clock()
        self.wedged = False
        self._task = (PeriodicTask("inference-watchdog", min(1.0, stall_seconds / 4),
                                   self.check) if stall_seconds > 0 else None)
        self._stalls = Counter(
            "federation_inference_stalls", "Times this node found itself wedged (no token "
            "from any open generation for the stall timeout).",
            registry=registry) if registry is not None else None
        self._count_file = count_file
        # The previous runs' stalls: each of them exited seconds after counting, before
        # a scrape could see its counter rise (see InferenceConfig.stall_count_file).
        self._stall_count = read_stall_count(count_file)
        if self._stalls is not None and self._stall_count:
            self._stalls.inc(self._stall_count)

    @classmethod
    def disabled(cls) -> StallWatchdog:
        """One that never fires (a servicer built without a watchdog)."""
        async def nothing() -> None:
            return None

        return cls(0.0, 0.0, nothing)

    async def start(self) -> None:
        if self._task is not None:
            await self._task.start()

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.stop()

    def refuse_if_wedged(self) -> None:
        if self.wedged:
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                "this inference node is wedged and restarting; retry on another node",
                retry_after_seconds=1.0)

    @contextlib.contextmanager
    def generation(self, fail: Fail) -> Iterator[Callable[[], None]]:
        """Watch one generation for its duration; yields the function to call at each
        token. ``fail`` ends the generation's stream with an error."""
        if not self._open:
            self._last_progress = self._clock()  # idle until now: nothing was late
        key = next(self._ids)
        self._open[key] = fail
        try:
            yield self.progress
        finally:
            del self._open[key]
            self.progress()

    def progress(self) -> None:
        self._last_progress = self._clock()

    async def check(self) -> None:
        """Detect a wedge (called periodically once started)."""
        silent = self._clock() - self._last_progress
        if self.wedged or not self._open or silent < self._stall:
            return
        self.wedged = True
        self._stall_count += 1
        if self._stalls is not None:
            self._stalls.inc()
        write_stall_count(self._count_file, self._stall_count)
        log.error("inference wedged: no token from any of the open generations; reporting "
                  "NOT_SERVING, ending them, and exiting to be restarted",
                  extra={"open_generations": len(self._open), "silent_seconds": round(silent, 1),
                         "exit_in_seconds": self._exit_after})
        timer = threading.Timer(self._exit_after, self._exit_process)
        timer.daemon = True
        timer.start()
        await self._on_wedged()
        error = FederationError(
            ErrorCode.UNAVAILABLE,
            f"the generation stalled (no token for {silent:.0f}s): this inference node is "
            "wedged and restarting; retry the request",
            retry_after_seconds=1.0)
        for fail in list(self._open.values()):
            fail(error)


def read_stall_count(path: Path | None) -> int:
    """Stalls recorded by earlier runs of this node; 0 when none (or unreadable: the
    count only feeds a metric, and must never stop a node from starting)."""
    if path is None:
        return 0
    try:
        return max(0, int(path.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0


def write_stall_count(path: Path | None, count: int) -> None:
    """Record the count before the exit; a failure (a full disk) is logged, not raised:
    the wedged node must still leave."""
    if path is None:
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(f"{count}\n")
        os.replace(partial, path)
    except OSError as exc:
        log.warning("could not record the stall count", extra={"path": str(path),
                                                               "error": str(exc)})
