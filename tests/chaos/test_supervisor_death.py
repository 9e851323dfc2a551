"""``federation up`` killed outright leaves nothing behind, and the home starts again;
a second ``federation up`` on a live home is refused and touches nothing.

The home lives in a 0700 directory (as ``mktemp -d`` makes), and no directory
above it changes mode.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from tests.up_support import (
    ancestor_modes,
    delete_embedded_data,
    running_processes,
    start_up,
    stop_up,
)

GONE_WITHIN_SECONDS = 5.0


async def test_killed_supervisor_leaves_no_process_and_the_home_starts_again(
        tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    home = private / "home"
    modes = ancestor_modes(private)
    first = await start_up(home, tmp_path / "first.log")
    try:
        pids = {name: first.pid(name) for name in first.supervisor_state["children"]}

        # A second supervisor on the same home: one line naming the first, nothing touched.
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "up", "--http-port", "0", env=first.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(second.communicate(), 60)
        assert out == b""
        assert second.returncode == 1
        assert err.decode().splitlines() == [
            f"federation: error: a federation is already running on {home} (supervisor pid "
            f"{first.process.pid}); stop it first (Ctrl-C in its terminal, or kill "
            f"{first.process.pid})"], err
        assert {name: first.pid(name) for name in pids} == pids
        assert first.endpoints["supervisor_pid"] == first.process.pid
        code, out_status, _ = await first.cli("status")
        assert code == 0, out_status

        processes = first.processes()
        assert len(processes) > len(pids)  # PostgreSQL's own processes too
        killed_at = time.monotonic()
        os.killpg(first.process.pid, signal.SIGKILL)
        await first.process.wait()
        while left := running_processes(processes):
            assert time.monotonic() - killed_at < GONE_WITHIN_SECONDS, \
                [(p.pid, p.name()) for p in left]
            await asyncio.sleep(0.1)
        print(f"\nevery process gone {time.monotonic() - killed_at:.1f}s after the SIGKILL")
        code, _, err_status = await first.cli("status")
        assert code == 1 and "no federation is running" in err_status

        again = await start_up(home, tmp_path / "again.log")
        try:
            code, out_status, _ = await again.cli("status")
            assert code == 0, out_status
            assert "another server might be running" not in again.output()
        finally:
            assert await stop_up(again) == 0
    finally:
        await stop_up(first)
        delete_embedded_data(home)
    assert ancestor_modes(private) == modes
    assert private.stat().st_mode & 0o777 == 0o700
