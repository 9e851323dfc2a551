"""``federation up`` keeps supervising when nobody reads its output any more.

Its progress lines go to stderr, and whoever reads them may go away: the terminal
closes, ``federation up 2>&1 | head`` has what it wanted. Each report after that
fails (EPIPE); the supervisor must still restart what exits, and still stop
everything on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from tests.up_support import (
    READY_WITHIN_SECONDS,
    TEST_MODEL_TOML,
    RunningUp,
    clean_env,
    delete_embedded_data,
    running_processes,
    stop_up,
    until,
)

BACK_WITHIN_SECONDS = 10.0


async def _up_with_stderr_read_then_closed(home: Path, log_path: Path) -> RunningUp:
    """``federation up`` whose stderr is a pipe: read until it is up, then closed."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "federation.toml").write_text(TEST_MODEL_TOML)
    env = clean_env(home)
    read_end, write_end = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "up", "--http-port", "0",
            stdout=asyncio.subprocess.DEVNULL, stderr=write_end, env=env,
            start_new_session=True)
    finally:
        os.close(write_end)
    seen = b""
    try:
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        while b"Press Ctrl-C to stop." not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            chunk = await asyncio.to_thread(os.read, read_end, 65536)
            assert chunk, f"federation up exited during start-up:\n{seen.decode()}"
            seen += chunk
    finally:
        os.close(read_end)  # the reader is gone: every later write gets EPIPE
        log_path.write_bytes(seen)
    return RunningUp(home, process, log_path, env)


async def test_a_node_is_still_restarted_and_ctrl_c_still_stops_all_once_stderr_is_gone(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = await _up_with_stderr_read_then_closed(home, tmp_path / "up.log")
    try:
        processes = up.processes()
        old = up.pid("keys")
        os.kill(old, signal.SIGKILL)
        await until(lambda: up.child("keys")["state"] == "running"
                    and up.child("keys")["pid"] != old, BACK_WITHIN_SECONDS)
        assert await up.serving("keys")
        assert up.child("keys")["restarts"] == 1
        assert up.process.returncode is None, "the supervisor exited"

        assert await stop_up(up) == 0
        assert running_processes(processes) == []
        states = {c["state"] for c in up.supervisor_state["children"].values()}
        assert states == {"stopped"}
    finally:
        await stop_up(up)
        delete_embedded_data(home)
