"""A second Ctrl-C stops ``federation up`` at once.

The first Ctrl-C stops each child gracefully in turn, and a node that does not
stop (here: frozen with SIGSTOP) holds that stop for its grace period and more.
The operator who presses Ctrl-C again must not have to wait for it: every child
still running is ended at once (PostgreSQL with its immediate shutdown, which
loses nothing committed), and the home starts again afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from tests.up_support import (
    TEST_MODEL_TOML,
    delete_embedded_data,
    running_processes,
    start_up,
    stop_up,
)

GRACE_SECONDS = 30.0
"""Each node's graceful stop: a frozen node would hold the first stop this long and more."""
STOPPED_WITHIN_SECONDS = 15.0
TOML = TEST_MODEL_TOML + f"\n[grpc]\ngrace_seconds = {GRACE_SECONDS}\n"


async def test_a_second_ctrl_c_stops_everything_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = await start_up(home, tmp_path / "up.log", toml=TOML)
    try:
        await up.issue_key()
        processes = up.processes()
        os.kill(up.pid("council"), signal.SIGSTOP)  # a node that will not stop gracefully

        started = time.monotonic()
        up.process.send_signal(signal.SIGINT)
        await asyncio.sleep(1.0)
        assert up.process.returncode is None
        up.process.send_signal(signal.SIGINT)
        await asyncio.wait_for(up.process.wait(), GRACE_SECONDS + 30)
        took = time.monotonic() - started
        assert took < STOPPED_WITHIN_SECONDS, (took, up.output()[-2000:])
        assert up.process.returncode == 0, up.output()[-2000:]
        assert "stopping at once: " in up.output()
        assert running_processes(processes) == []
        assert "Traceback" not in up.output()

        # PostgreSQL's immediate shutdown lost nothing: the key issued before is there.
        again = await start_up(home, tmp_path / "again.log", toml=TOML)
        try:
            code, out, err = await again.cli("status")
            assert code == 0, out + err
            code, out, err = await again.cli("keys", "list", "--tenant", "t", "--json")
            assert code == 0, err
            assert len(json.loads(out)) == 1, out
        finally:
            assert await stop_up(again) == 0
    finally:
        await stop_up(up)
        delete_embedded_data(home)


async def test_a_hangup_stops_the_federation_gracefully(tmp_path: Path) -> None:
    # The terminal of `federation up` closed (its window, an ssh session lost): SIGHUP's
    # default action ended the supervisor at once, its children left to the lifeline's
    # short orphan stop, endpoints.json and the state file saying "running" behind it.
    home = tmp_path / "home"
    up = await start_up(home, tmp_path / "up.log")
    try:
        processes = up.processes()
        up.process.send_signal(signal.SIGHUP)
        assert await asyncio.wait_for(up.process.wait(), 60) == 0, up.output()[-2000:]
        assert running_processes(processes) == []
        assert not (home / "endpoints.json").exists()
        states = {c["state"] for c in up.supervisor_state["children"].values()}
        assert states == {"stopped"}
    finally:
        await stop_up(up)
        delete_embedded_data(home)
