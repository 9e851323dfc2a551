"""``federation status`` while ``federation up`` is still starting says so.

It used to answer from whatever it found: before the first child was recorded, "no
federation is running" (and to start one, which would be refused); after it, the
addresses of an ``endpoints.json`` left by an earlier run, so it called components
unreachable that were starting, or serving elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.up_support import (
    TEST_MODEL_TOML,
    RunningUp,
    clean_env,
    delete_embedded_data,
    stop_up,
    until,
)

HELD_SECONDS = 30.0


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung database host)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


async def _spawn_up(home: Path, log_path: Path, *argv: str,
                    env: dict[str, str] | None = None) -> RunningUp:
    home.mkdir(parents=True, exist_ok=True)
    (home / "federation.toml").write_text(TEST_MODEL_TOML)
    full_env = clean_env(home) | (env or {})
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "up", "--http-port", "0", *argv,
            stdout=log, stderr=log, env=full_env, start_new_session=True)
    return RunningUp(home, process, log_path, full_env)


async def test_before_any_child_is_recorded_status_says_it_is_starting(
        tmp_path: Path, silent_server: int) -> None:
    home = tmp_path / "home"
    up = await _spawn_up(home, tmp_path / "up.log", "--database-url",
                         f"postgresql://u:p@127.0.0.1:{silent_server}/federation",
                         env={"FEDERATION_DATABASE_CONNECT_TIMEOUT_SECONDS": str(HELD_SECONDS),
                              "FEDERATION_DATABASE_ACQUIRE_TIMEOUT_SECONDS": str(HELD_SECONDS)})
    try:
        await until(lambda: "PostgreSQL: using" in up.output(), 20)
        code, out, err = await up.cli("status")
        assert (code, out) == (1, ""), out + err
        assert err.splitlines() == [
            f"federation: error: the federation on {home} is starting (supervisor pid "
            f"{up.process.pid}); ask again once it is up"], err
    finally:
        await stop_up(up)


async def test_while_a_child_starts_status_ignores_an_earlier_runs_addresses(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    # What a `federation up` killed with SIGKILL leaves: its addresses, closed now.
    (home / "endpoints.json").write_text(json.dumps({
        "home": str(home), "supervisor_pid": gone.pid,
        "gateway": {"url": "http://127.0.0.1:9", "pid": gone.pid},
        "nodes": {"keys": {"grpc": "127.0.0.1:9", "pid": gone.pid}},
        "database": {"dsn": "postgresql://u:p@127.0.0.1:9/federation", "embedded": True}}))
    up = await _spawn_up(home, tmp_path / "up.log")
    held = None
    try:
        deadline = time.monotonic() + 60
        while held is None:  # hold the start: freeze keys as soon as it is spawned
            assert time.monotonic() < deadline, up.output()
            try:
                held = up.pid("keys")
            except (FileNotFoundError, ValueError, KeyError, TypeError, AssertionError):
                await asyncio.sleep(0.02)
        os.kill(held, signal.SIGSTOP)

        code, out, err = await up.cli("status")
        assert code == 1, out + err
        assert "unreachable" not in out, out
        assert out.rstrip().endswith(f"the federation is starting (supervisor pid "
                                     f"{up.process.pid}); ask again once it is up"), out
        code, out, _ = await up.cli("status", "--json")
        report = json.loads(out)
        assert code == 1 and report["starting"] is True and report["healthy"] is False
        assert {c["health"] for c in report["components"].values()} == {"starting"}, report

        os.kill(held, signal.SIGCONT)
        held = None
        await until(lambda: up.endpoints.get("supervisor_pid") == up.process.pid, 60)
        code, out, err = await up.cli("status", "--json")
        assert code == 0, out + err
        assert json.loads(out)["starting"] is False
    finally:
        if held is not None:
            os.kill(held, signal.SIGCONT)
        await stop_up(up)
        delete_embedded_data(home)
