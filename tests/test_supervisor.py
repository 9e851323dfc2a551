"""The supervisor's parts on their own: back-off and crash loops, one supervisor per home,
and the clean-up after a dead supervisor, which never signals a process that is not its own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from federation.config import SupervisorConfig
from federation.errors import CommandError
from federation.launch.state import (
    ChildState,
    ChildStatus,
    SupervisorState,
    live_state,
    read_state,
    write_state,
)
from federation.launch.supervisor import HomeLock, RestartPolicy, Supervised, clean_up_previous

CONFIG = SupervisorConfig(restart_initial_delay_seconds=0.5, restart_max_delay_seconds=4.0,
                          crash_loop_restarts=5, crash_loop_window_seconds=60.0,
                          stable_after_seconds=30.0)


def test_delay_doubles_up_to_the_cap_then_a_crash_loop_is_declared() -> None:
    policy = RestartPolicy(CONFIG)
    delays = [policy.next_delay(now=float(t), uptime=1.0) for t in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, None]


def test_a_child_that_ran_long_enough_starts_again_from_the_initial_delay() -> None:
    policy = RestartPolicy(CONFIG)
    assert [policy.next_delay(float(t), uptime=1.0) for t in range(3)] == [0.5, 1.0, 2.0]
    assert policy.next_delay(3.0, uptime=CONFIG.stable_after_seconds) == 0.5


def test_restarts_older_than_the_window_do_not_count_towards_a_crash_loop() -> None:
    policy = RestartPolicy(CONFIG)
    for t in range(5):
        assert policy.next_delay(float(t), uptime=40.0) == 0.5
    assert policy.next_delay(5.0, uptime=40.0) is None  # 5 restarts within 60 s
    later = RestartPolicy(CONFIG)
    for t in range(5):
        later.next_delay(float(t * 20), uptime=40.0)  # 0, 20, 40, 60, 80
    assert later.next_delay(100.0, uptime=40.0) == 0.5  # only 3 within the last 60 s


def test_a_second_supervisor_on_a_home_is_refused_with_the_first_ones_pid(tmp_path: Path
                                                                          ) -> None:
    lock = HomeLock.acquire(tmp_path)
    try:
        with pytest.raises(CommandError, match=rf"supervisor pid {lock_pid(lock)}\)"):
            HomeLock.acquire(tmp_path)
    finally:
        lock.release()
    HomeLock.acquire(tmp_path).release()  # free again once released


def lock_pid(lock: HomeLock) -> int:
    return int(lock.path.read_text())


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that is not the federation's (its PID stands for a reused one)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "federation"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _record(home: Path, pid: int, create_time: float) -> None:
    (home / "run").mkdir(parents=True, exist_ok=True)
    write_state(home, SupervisorState(
        pid=2 ** 22 + 1, create_time=1.0,  # a supervisor that is gone
        children={"keys": ChildStatus("keys", ChildState.RUNNING, pid, create_time)}))


def test_a_recorded_pid_now_used_by_another_process_is_never_signalled(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    started = psutil.Process(sleeper.pid).create_time()
    _record(tmp_path, sleeper.pid, started - 100.0)  # same PID, another process
    reports: list[str] = []
    clean_up_previous(tmp_path, None, reports.append)
    assert reports == []
    assert sleeper.poll() is None, "an unrelated process was signalled"


def test_a_process_the_dead_supervisor_left_is_stopped(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    _record(tmp_path, sleeper.pid, psutil.Process(sleeper.pid).create_time())
    assert read_state(tmp_path) is not None and live_state(tmp_path) is None
    reports: list[str] = []
    clean_up_previous(tmp_path, None, reports.append)
    assert sleeper.wait(5) == -15  # SIGTERM: a graceful stop first
    assert reports == ["the previous supervisor of this home is gone; stopping what it "
                       f"left: keys (pid {sleeper.pid})"]


def test_a_live_supervisor_of_an_earlier_version_is_refused_and_left_alone(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    # Earlier versions took no lock; their endpoints.json names the supervisor.
    (tmp_path / "endpoints.json").write_text(json.dumps({"supervisor_pid": sleeper.pid}))
    with pytest.raises(CommandError, match=rf"supervisor pid {sleeper.pid}\)"):
        clean_up_previous(tmp_path, None, print)
    assert sleeper.poll() is None


class _ExitingChild:
    """Runs ``argv``; ready once it has lived 0.2 s (a crash loop exits before that)."""

    stop_now_signal = signal.SIGKILL

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.name = "broken"
        self.argv = argv
        self.log_path = log_path
        self.spawned = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        self.spawned += 1
        with self.log_path.open("ab") as log:
            return subprocess.Popen(self.argv, stdout=log, stderr=log)

    async def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        await asyncio.sleep(0.2)
        if process.poll() is not None:
            raise RuntimeError("exited during start-up")

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        process.kill()
        process.wait()

    def on_ready(self, process: subprocess.Popen[bytes]) -> None:
        pass


FAST = SupervisorConfig(restart_initial_delay_seconds=0.01, crash_loop_restarts=2)


async def _supervise_until_failed(spec: _ExitingChild, first: subprocess.Popen[bytes]
                                  ) -> tuple[Supervised, list[str]]:
    reports: list[str] = []
    changes: list[str] = []
    child = Supervised(spec, FAST, lambda: changes.append(str(child.status.state)),
                       reports.append)
    child.process = first  # as if its first start had succeeded
    child.watch()
    for _ in range(100):
        if child.status.state == ChildState.FAILED:
            break
        await asyncio.sleep(0.05)
    await child.stop()
    assert changes[-1] == "failed", changes  # recorded, and stop() leaves it failed
    return child, reports


async def test_a_child_exiting_at_once_is_restarted_then_failed_and_reported(
        tmp_path: Path) -> None:
    spec = _ExitingChild([sys.executable, "-c", "print('bad config'); raise SystemExit(3)"],
                         tmp_path / "broken.log")
    child, reports = await _supervise_until_failed(spec, spec.spawn())
    assert spec.spawned == 3
    assert (child.status.restarts, child.status.last_exit) == (2, "exit status 3")
    assert [r.split(" (")[0] for r in reports] == [
        "broken exited", "broken exited", "broken FAILED: crash loop"]
    assert f"Log {tmp_path / 'broken.log'}:\n    bad config" in reports[-1]


async def test_a_child_that_cannot_even_be_started_ends_failed_saying_why(
        tmp_path: Path) -> None:
    spec = _ExitingChild([sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "x.log")
    first = spec.spawn()
    spec.argv = [str(tmp_path / "no-such-program")]  # e.g. the venv was removed
    child, _ = await _supervise_until_failed(spec, first)
    assert child.status.last_exit.startswith("could not start: [Errno 2]")


def test_exits_not_counted_back_off_but_never_make_a_crash_loop() -> None:
    policy = RestartPolicy(CONFIG)
    delays = [policy.next_delay(float(t), uptime=1.0, counted=False) for t in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, *[4.0] * 6]
    # ...and do not use up the counted ones either.
    counted = [policy.next_delay(10.0 + t, uptime=1.0) for t in range(6)]
    assert counted[:5] == [4.0] * 5 and counted[5] is None


async def test_while_a_child_waits_for_its_restart_no_pid_is_shown(tmp_path: Path) -> None:
    # The PID of the process that exited stayed in supervisor.json, `federation status`
    # and endpoints.json through the back-off, free to be reused by any process.
    spec = _ExitingChild([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x.log")
    first = spec.spawn()
    slow = SupervisorConfig(restart_initial_delay_seconds=30.0)
    child = Supervised(spec, slow, lambda: None, lambda _: None)
    child.process = first
    child.status.pid = first.pid
    child.watch()
    try:
        for _ in range(100):
            if child.status.state == ChildState.RESTARTING:
                break
            await asyncio.sleep(0.05)
        assert child.status.state == ChildState.RESTARTING
        assert (child.status.pid, child.status.last_exit) == (None, "exit status 3")
    finally:
        await child.stop()


def _refuse() -> None:
    raise RuntimeError("refused")


async def test_a_spawn_failing_with_any_error_is_counted_and_ends_failed_saying_why(
        tmp_path: Path) -> None:
    # Popen raises SubprocessError, not OSError, when its preexec_fn fails (PostgreSQL's
    # spawn has one): that ended the child's supervision, "restarting" for ever.
    spec = _PreexecChild([sys.executable, "-c", "raise SystemExit(1)"], tmp_path / "x.log")
    first = spec.spawn()
    spec.preexec = _refuse
    child, reports = await _supervise_until_failed(spec, first)
    assert child.status.last_exit == "could not start: Exception occurred in preexec_fn."
    assert reports[-1].startswith("broken FAILED: crash loop (could not start")


class _PreexecChild(_ExitingChild):
    preexec: Callable[[], None] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        self.spawned += 1
        with self.log_path.open("ab") as log:
            return subprocess.Popen(self.argv, stdout=log, stderr=log,
                                    preexec_fn=self.preexec)
