"""A node that exits at once on every start ends ``failed``, reported once, while the
rest of the federation (and ``federation up``) keeps running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp

from federation.config import ROLES_WITH_SERVICES
from tests.up_support import TEST_MODEL, TEST_MODEL_TOML, federation_up

CRASH_LOOP_TOML = TEST_MODEL_TOML + """
[supervisor]
restart_initial_delay_seconds = 0.1
crash_loop_restarts = 2
crash_loop_window_seconds = 60
"""


async def test_crash_loop_is_failed_and_reported_and_the_rest_keeps_serving(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with federation_up(home, tmp_path / "up.log", toml=CRASH_LOOP_TOML) as up:
        key = await up.issue_key()
        # An operator's mistake: the council's certificate is gone, so every start of
        # the council now exits at once (one line in its log, exit status 1).
        (home / "pki" / "issued" / "council-local.pem").unlink()
        os.kill(up.pid("council"), signal.SIGKILL)
        started = time.monotonic()
        while up.child("council")["state"] != "failed":
            assert time.monotonic() - started < 30, up.output()
            await asyncio.sleep(0.1)

        council = up.child("council")
        assert council["restarts"] == 2
        assert council["last_exit"] == "exit status 1"
        assert up.process.returncode is None, "federation up stopped"
        reports = [line for line in up.output().splitlines() if "crash loop" in line]
        assert len(reports) == 1, up.output()
        assert reports[0].split("] ", 1)[1].startswith("council FAILED: crash loop (exit status 1")
        assert "2 restarts" in reports[0] and str(home / "logs" / "council.log") in reports[0]
        assert "council-local.pem is missing" in up.output().split(reports[0], 1)[1], "no tail"
        assert up.endpoints["nodes"]["council"]["pid"] is None

        others = [r for r in ROLES_WITH_SERVICES if r != "council"]
        for role in others:
            assert await up.serving(role), role
            assert up.child(role)["state"] == "running"

        status, health = await up.health()
        assert status == 503
        assert health["components"]["council"]["status"] == "unreachable"
        assert health["components"]["council"]["supervisor"] == {
            "state": "failed", "restarts": 2, "last_exit": "exit status 1"}
        assert health["supervisor"]["children"]["council"]["state"] == "failed"
        assert all(health["components"][r]["status"] == "serving"
                   for r in others if r != "inference")
        assert health["components"]["inference"]["status"] == "serving"

        code, out, _ = await up.cli("status", "--json")
        report = json.loads(out)
        assert code == 1 and report["healthy"] is False
        assert report["components"]["council"] == {
            **report["components"]["council"], "health": "unreachable", "state": "failed",
            "restarts": 2, "last_exit": "exit status 1", "pid": None}
        assert all(report["components"][r]["health"] == "serving"
                   for r in [*others, "gateway", "postgres"])
        code, out, _ = await up.cli("status")
        assert code == 1
        assert "council failed after 2 restarts (exit status 1)" in out

        async with aiohttp.ClientSession() as session, session.post(
                up.gateway + "/v1/chat/completions",
                json={"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200, await response.text()
