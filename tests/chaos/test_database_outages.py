"""PostgreSQL outages under a running federation, as a client and an operator see them.

* An external cluster (``FEDERATION_DATABASE_URL``) is SIGKILLed and stays down: clients
  get 503, never 500; ``/health`` says 503 and names the database within the pool
  timeout; when it returns, everything recovers with no node restarted, and every
  answered request is audited.
* Every embedded PostgreSQL process is SIGSTOPped for 30 s: 503 (never 500, never 429
  "backend is full" from requests stuck on the database), the requests caught in flight
  included, within a probe of the database watch rather than the statement timeout;
  then recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from federation.config import DatabaseConfig
from federation.db import ABORT_AFTER_FAILED_PROBES
from tests.db_support import OwnCluster, own_cluster
from tests.up_support import TEST_MODEL_TOML, ChatClient, RunningUp, federation_up, until

STALL_SECONDS = 30.0
CLIENTS = 4
UNHEALTHY_WITHIN = DatabaseConfig().acquire_timeout_seconds
"""The acceptance bound: ``/health`` answers 503 within the pool's acquire timeout."""
RECOVERED_WITHIN = 20.0
_DB = DatabaseConfig()
ANSWERED_WITHIN = (ABORT_AFTER_FAILED_PROBES
                   * (_DB.probe_interval_seconds + _DB.probe_timeout_seconds) + 2.0)
"""The acceptance bound for a request caught by a stalled database: the failed probes
in a row after which the watch fails the statements waiting (each a probe interval and
a probe timeout), and some slack for a loaded machine; well under the statement
timeout (``command_timeout_seconds``) it used to wait."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    with own_cluster(tmp_path / "pg" / "data") as running:
        yield running


@contextlib.asynccontextmanager
async def chatting(up: RunningUp, clients: int = CLIENTS) -> AsyncIterator[list[ChatClient]]:
    """``clients`` sequential chat loops with one key, running for the block."""
    key = await up.issue_key()
    loops = [ChatClient(up.gateway, key) for _ in range(clients)]
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        await until(lambda: all(loop.ok_since(0) for loop in loops), 20)
        yield loops
    finally:
        for loop in loops:
            loop.stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def database_unhealthy(up: RunningUp) -> bool:
    status, body = await up.health()
    return status == 503 and body["components"]["database"]["status"] == "unreachable"


async def database_healthy(up: RunningUp) -> bool:
    status, body = await up.health()
    return status == 200 and body["components"]["database"]["status"] == "serving"


async def eventually_true(check: Callable[[], Awaitable[bool]], seconds: float) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not within {seconds}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def check_nothing_lost(up: RunningUp, loops: list[ChatClient],
                             node_pids: dict[str, int]) -> Counter[int | str]:
    outcomes = [o for loop in loops for o in loop.outcomes]
    statuses: Counter[int | str] = Counter(status for _, status, _ in outcomes)
    unexpected = [o for o in outcomes if o[1] not in (200, 503)]
    assert unexpected == [], unexpected[:5]
    assert {role: up.pid(role) for role in node_pids} == node_pids, "a node was restarted"
    audited = await up.audited_answers()
    answered = [detail for _, status, detail in outcomes if status == 200]
    assert [r for r in answered if audited[r] != 1] == []
    code, out, err = await up.cli("audit", "verify")
    assert code == 0 and "intact" in out, out + err
    return statuses


def node_pids(up: RunningUp) -> dict[str, int]:
    return {role: up.pid(role) for role in up.supervisor_state["children"]
            if role != "postgres"}


async def test_an_external_database_killed_and_back(tmp_path: Path,
                                                    cluster: OwnCluster) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log",
                             extra_env={"FEDERATION_DATABASE_URL": cluster.url}) as up:
        pids = node_pids(up)
        async with chatting(up) as loops:
            await asyncio.to_thread(cluster.kill)
            killed_at = time.monotonic()
            unhealthy = await eventually_true(lambda: database_unhealthy(up), UNHEALTHY_WITHIN)
            await until(lambda: all(any(at > killed_at and status == 503
                                        for at, status, _ in loop.outcomes)
                                    for loop in loops), UNHEALTHY_WITHIN)
            await asyncio.sleep(2)  # down for a while: no node may give up and exit

            cluster.restart()  # same port, same data
            back_at = time.monotonic()
            recovered = await until(lambda: all(loop.ok_since(back_at) for loop in loops),
                                    RECOVERED_WITHIN)
        statuses = await check_nothing_lost(up, loops, pids)
        # Chats can succeed again (the key authority and memory reconnected) before the
        # gateway's own database watch, one probe a second on its own connection, has.
        healthy = await eventually_true(lambda: database_healthy(up), RECOVERED_WITHIN)
    print(f"\n/health 503 {unhealthy:.1f}s after the kill; 200s again {recovered:.1f}s after "
          f"the restart, /health 200 {healthy:.1f}s after that; outcomes {dict(statuses)}")


async def test_a_stalled_database_answers_503_then_recovers(tmp_path: Path) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log") as up:
        pids = node_pids(up)
        postmaster = psutil.Process(up.pid("postgres"))
        async with chatting(up) as loops:
            stalled = [postmaster, *postmaster.children(recursive=True)]
            for process in stalled:
                process.send_signal(signal.SIGSTOP)
            try:
                stalled_at = time.monotonic()
                unhealthy = await eventually_true(lambda: database_unhealthy(up),
                                                  UNHEALTHY_WITHIN)
                await asyncio.sleep(STALL_SECONDS - (time.monotonic() - stalled_at))
            finally:
                OwnCluster.resume(stalled)
            resumed_at = time.monotonic()
            recovered = await until(lambda: all(loop.ok_since(resumed_at) for loop in loops),
                                    RECOVERED_WITHIN)
        statuses = await check_nothing_lost(up, loops, pids)
        assert statuses[503] > 0, "the stall was not seen"
        slowest = max(longest_wait(loop, stalled_at, resumed_at) for loop in loops)
        assert slowest < ANSWERED_WITHIN, f"a request waited {slowest:.1f}s for its answer"
        assert up.child("postgres")["restarts"] == 0  # stalled is not dead
    print(f"\n/health 503 {unhealthy:.1f}s into the stall; longest wait for an answer "
          f"{slowest:.1f}s; 200s again {recovered:.1f}s after SIGCONT; "
          f"outcomes {dict(statuses)}")


def longest_wait(loop: ChatClient, start: float, end: float) -> float:
    """The longest a request of ``loop`` can have waited for its answer between ``start``
    and ``end``: a loop sends its next request as soon as it has the previous answer, so
    the time between two answers bounds the second one's wait."""
    answered = [start] + [at for at, _, _ in loop.outcomes if start < at < end] + [end]
    return max(later - earlier for earlier, later in itertools.pairwise(answered))


FAST_CRASH_LOOP = TEST_MODEL_TOML + """
[supervisor]
restart_max_delay_seconds = 2.0
crash_loop_restarts = 3
"""
"""A crash loop after 3 restarts, at most 2 s apart: reached within seconds."""


async def test_a_node_restarted_while_the_database_is_down_comes_back_with_it(
        tmp_path: Path, cluster: OwnCluster) -> None:
    # It used to exit 1 at each start ("cannot connect to PostgreSQL"), a crash loop: left
    # `failed` for good, the database's return notwithstanding.
    async with federation_up(tmp_path / "home", tmp_path / "up.log", toml=FAST_CRASH_LOOP,
                             extra_env={"FEDERATION_DATABASE_URL": cluster.url}) as up:
        await asyncio.to_thread(cluster.kill)
        os.kill(up.pid("keys"), signal.SIGKILL)
        await until(lambda: up.child("keys")["restarts"] > 3 + 1, 40)
        keys = up.child("keys")
        assert keys["state"] == "restarting", (keys, up.output()[-3000:])
        assert keys["last_exit"] == "exit status 69 (the database is unavailable)", keys
        assert "keys FAILED" not in up.output()

        cluster.restart()
        await until(lambda: up.child("keys")["state"] == "running", 30)
        assert await up.serving("keys")
        code, out, err = await up.cli("status")
        assert code == 0, out + err
