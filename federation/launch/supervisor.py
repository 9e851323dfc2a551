"""Supervision for ``federation up``: restarts with back-off, crash loops, one home, no orphans.

* :class:`RestartPolicy` decides, after each unexpected exit, how long to wait
  before the restart, or that the child is in a crash loop (then it is marked
  ``failed`` and left stopped; the other children keep running).
* :class:`Supervised` runs one child through that policy and records its state.
* :class:`HomeLock` makes one supervisor per home: an ``flock`` held for the
  supervisor's life (the kernel releases it however the process dies).
* :func:`clean_up_previous` stops what a dead supervisor left on the home, but
  only processes it can prove are that supervisor's (PID *and* start time).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import psutil

from federation.config import SupervisorConfig
from federation.db.errors import EXIT_DATABASE_UNAVAILABLE
from federation.db.postmaster import PostmasterPid, describe_exit, postmaster_alive
from federation.errors import CommandError
from federation.launch.endpoints import supervisor_alive
from federation.launch.state import (
    ChildState,
    ChildStatus,
    process_matches,
    process_start_time,
    read_state,
)
from federation.periodic import cancel_and_wait

log = logging.getLogger(__name__)

EXIT_POLL_SECONDS = 0.1
"""How often each child is checked for an exit (a non-blocking ``waitpid``): portable,
and 8 children cost nothing measurable; a crash is noticed within this."""

LEFTOVER_STOP_SECONDS = 10.0
"""How long a process left by a dead supervisor gets to stop before SIGKILL."""


class RestartPolicy:
    """Exponential back-off with a crash-loop limit (see :class:`SupervisorConfig`)."""

    def __init__(self, config: SupervisorConfig) -> None:
        self._config = config
        self._consecutive = 0
        self._restarts: deque[float] = deque()

    def next_delay(self, now: float, uptime: float, *, counted: bool = True) -> float | None:
        """Seconds to wait before restarting a child that exited at ``now`` after
        ``uptime`` seconds of running; ``None`` when it is in a crash loop. An exit not
        ``counted`` (the database unavailable) backs off the same way but never makes one."""
        config = self._config
        if uptime >= config.stable_after_seconds:
            self._consecutive = 0
        while self._restarts and self._restarts[0] <= now - config.crash_loop_window_seconds:
            self._restarts.popleft()
        if counted and len(self._restarts) >= config.crash_loop_restarts:
            return None
        delay = min(config.restart_max_delay_seconds,
                    config.restart_initial_delay_seconds * 2.0 ** self._consecutive)
        self._consecutive += 1
        if counted:
            self._restarts.append(now)
        return delay


class ChildSpec(Protocol):
    """How to run one kind of child: start it, know it is ready, stop it."""

    name: str
    log_path: Path
    stop_now_signal: signal.Signals
    """What ends the process at once, when the operator will not wait for :meth:`stop`."""

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process. Called on the event-loop thread (see federation.launch.lifeline)."""

    async def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Return once it serves; raise if it exits or does not become ready in time."""

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop it gracefully (and forcibly past a grace period)."""

    def on_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Called each time a (re)started process serves, after its state was recorded."""


class Supervised:
    """One child under supervision: its process, its state, its restarts."""

    def __init__(self, spec: ChildSpec, config: SupervisorConfig,
                 on_change: Callable[[], None], report: Callable[[str], None]) -> None:
        self.spec = spec
        self.status = ChildStatus(spec.name, log=str(spec.log_path))
        self.process: subprocess.Popen[bytes] | None = None
        self._policy = RestartPolicy(config)
        self._on_change = on_change
        self._report = report
        self._started_at = 0.0
        self._exited_at = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        """First start (part of ``federation up``'s start-up: a failure is fatal)."""
        self._spawn()
        assert self.process is not None
        await self.spec.wait_ready(self.process)
        self._ready()

    def watch(self) -> None:
        """Restart the child whenever it exits, from now until :meth:`stop`."""
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def unwatch(self) -> None:
        """Stop restarting the child (the process itself keeps running)."""
        await cancel_and_wait(self._task)
        self._task = None

    async def stop(self) -> None:
        await self.unwatch()
        if self.process is not None and self.process.poll() is None:
            await self.spec.stop(self.process)
        if self.status.state != ChildState.FAILED:
            self._set(ChildState.STOPPED)

    def stop_at_once(self) -> bool:
        """Send the process its ``stop_now_signal``; whether it was still running."""
        process = self.process
        if process is None or process.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(self.spec.stop_now_signal)
        return True

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.spec.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "    (no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------

    def _spawn(self) -> None:
        self._started_at = time.monotonic()
        self.process = self.spec.spawn()
        self.status.pid = self.process.pid
        self.status.create_time = process_start_time(self.process.pid)
        self._on_change()

    def _ready(self) -> None:
        assert self.process is not None
        self._set(ChildState.RUNNING)
        self.spec.on_ready(self.process)

    def _set(self, state: ChildState) -> None:
        self.status.state = state
        self._on_change()

    async def _supervise(self) -> None:
        ended: int | str | None = await self._wait_exit()
        while (delay := self._record_exit(ended, time.monotonic())) is not None:
            await asyncio.sleep(delay)
            ended = await self._restart()
            if ended is None:
                ended = await self._wait_exit()

    async def _restart(self) -> int | str | None:
        """Start the child again; ``None`` once it serves, else how this attempt ended
        (its exit status, or why it could not be started)."""
        exited_at = self._exited_at
        try:
            self._spawn()
        except Exception as exc:
            # Out of file descriptors or processes (OSError), a preexec_fn that failed
            # (SubprocessError), a data directory another server holds (PostgreSQL): an
            # attempt that failed, counted like an exit. Raised, it ended this supervision
            # silently (the child "restarting" for ever) and then the federation's stop.
            return f"could not start: {_first_line(exc)}"
        assert self.process is not None
        try:
            await self.spec.wait_ready(self.process)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.process.poll() is None:
                self._report(f"{self.name} did not become ready ({_first_line(exc)}); "
                             "killing it")
                await self._kill_unready()
            return await self._wait_exit()
        self._ready()
        self._report(f"{self.name} serving again (pid {self.process.pid}, "
                     f"{time.monotonic() - exited_at:.1f}s after the exit)")
        return None

    async def _wait_exit(self) -> int | None:
        return None if self.process is None else await process_exit(self.process)

    def _record_exit(self, how: int | str | None, now: float) -> float | None:
        """Record how the child ended (exit status, or why it could not start); the delay
        before its restart, or ``None`` when that makes a crash loop."""
        uptime = now - self._started_at
        waiting = how == EXIT_DATABASE_UNAVAILABLE
        ended = how if isinstance(how, str) else describe_exit(how)
        if waiting:
            ended += " (the database is unavailable)"
        self._exited_at = now
        self.status.last_exit = ended
        self.status.last_exit_at = time.time()
        # No process now: `federation status`, endpoints.json and scripts must not be
        # shown a PID that is free to be reused by any other process.
        self.status.pid = self.status.create_time = None
        delay = self._policy.next_delay(now, uptime, counted=not waiting)
        if delay is None:
            # The reason first: whoever then sees the state "failed" finds it printed.
            self._report(
                f"{self.name} FAILED: crash loop ({ended} after {uptime:.1f}s, "
                f"{self.status.restarts} restarts already); left stopped, everything else "
                f"keeps running. Log {self.spec.log_path}:\n{self.log_tail()}")
            self._set(ChildState.FAILED)
            return None
        self.status.restarts += 1
        self._set(ChildState.RESTARTING)
        self._report(f"{self.name} exited ({ended} after {uptime:.1f}s); restarting in "
                     f"{delay:.1f}s (restart {self.status.restarts}; log {self.spec.log_path})")
        return delay

    async def _kill_unready(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process_exit(process)


async def process_exit(process: subprocess.Popen[bytes],
                       limit_seconds: float | None = None) -> int | None:
    """The exit status of ``process`` once it exits; ``None`` if it still runs after
    ``limit_seconds``. Polled: a ``Popen`` has nothing to await, and a poll every
    ``EXIT_POLL_SECONDS`` is portable and costs nothing measurable."""
    deadline = None if limit_seconds is None else time.monotonic() + limit_seconds
    while (returncode := process.poll()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(EXIT_POLL_SECONDS)
    return returncode


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# -- one supervisor per home ---------------------------------------------------------


class HomeLock:
    """An ``flock`` on ``run/supervisor.lock`` held for the supervisor's whole life.

    The descriptor is not inheritable, so no child keeps the lock alive after the
    supervisor is gone; the kernel drops it however the supervisor dies.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        path = home / "run" / "supervisor.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CommandError(
                f"a federation is already running on {home} (supervisor pid {holder}); stop it "
                f"first (Ctrl-C in its terminal, or kill {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    @staticmethod
    def holder(home: Path) -> int | None:
        """The PID of the supervisor holding the lock of ``home`` now, found without
        touching the lock (taking it, even shared for an instant, could make a
        ``federation up`` starting at that moment refuse): the PID it wrote, if that
        process is a ``federation`` one started before it wrote it."""
        path = home / "run" / "supervisor.lock"
        try:
            pid, written = int(path.read_text().split()[0]), path.stat().st_mtime
        except (OSError, ValueError, IndexError):
            return None
        return pid if supervisor_alive(pid, written) else None


# -- what a dead supervisor left -------------------------------------------------------


def clean_up_previous(home: Path, data_dir: Path | None,
                      report: Callable[[str], None]) -> None:
    """Stop what a supervisor that is gone left running on ``home``.

    Call with the :class:`HomeLock` held (so no supervisor is alive on the home). Only
    processes proven to be that supervisor's are signalled: those in its state file
    (PID and start time), the children listed in an ``endpoints.json`` of an earlier
    version (PID, ``--home`` on the command line, started before the file was
    written), and the postmaster of ``postmaster.pid`` (PID and the start time it
    records). A live supervisor of an earlier version (no lock) makes this refuse.
    """
    endpoints = _read_endpoints(home)
    _refuse_if_legacy_supervisor_alive(home, endpoints)
    leftovers: dict[int, str] = {}
    state = read_state(home)
    if state is not None:
        for child in state.children.values():
            if child.pid and process_matches(child.pid, child.create_time):
                leftovers[child.pid] = child.name
    leftovers.update(_legacy_children(home, endpoints))
    postmaster = PostmasterPid.read(data_dir) if data_dir is not None else None
    if postmaster is not None and postmaster_alive(postmaster):
        leftovers[postmaster.pid] = "postgres"
    if not leftovers:
        return
    names = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(leftovers.items()))
    report(f"the previous supervisor of this home is gone; stopping what it left: {names}")
    _stop_all(leftovers)


def _read_endpoints(home: Path) -> tuple[dict[str, object], float] | None:
    path = home / "endpoints.json"
    try:
        return json.loads(path.read_text()), path.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return None


def _refuse_if_legacy_supervisor_alive(home: Path,
                                       endpoints: tuple[dict[str, object], float] | None) -> None:
    if endpoints is None:
        return
    data, written = endpoints
    pid = data.get("supervisor_pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if supervisor_alive(pid, written):
        raise CommandError(
            f"a federation is already running on {home} (supervisor pid {pid}); stop it first "
            f"(Ctrl-C in its terminal, or kill {pid})")


def _legacy_children(home: Path, endpoints: tuple[dict[str, object], float] | None
                     ) -> dict[int, str]:
    """Children of an earlier version's supervisor, which recorded no start times."""
    if endpoints is None:
        return {}
    data, written = endpoints
    listed: dict[int, str] = {}
    nodes = data.get("nodes")
    if isinstance(nodes, dict):
        listed.update({n["pid"]: role for role, n in nodes.items()
                       if isinstance(n, dict) and isinstance(n.get("pid"), int)})
    gateway = data.get("gateway")
    if isinstance(gateway, dict) and isinstance(gateway.get("pid"), int):
        listed[gateway["pid"]] = "gateway"
    found = {}
    for pid, name in listed.items():
        try:
            process = psutil.Process(pid)
            ours = (process.create_time() <= written and str(home) in process.cmdline()
                    and process.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            continue
        if ours:
            found[pid] = name
    return found


def _stop_all(leftovers: dict[int, str]) -> None:
    processes = []
    for pid, name in leftovers.items():
        try:
            process = psutil.Process(pid)
            # PostgreSQL: SIGINT is a fast shutdown. Nodes and gateway: SIGTERM, graceful.
            process.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
            processes.append(process)
        except psutil.Error:
            continue
    for process in _wait_gone(processes, LEFTOVER_STOP_SECONDS):
        with contextlib.suppress(psutil.Error):
            process.kill()


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still running after ``timeout`` (a zombie is not running: these
    are not our children, and whoever adopted them may never reap them)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
