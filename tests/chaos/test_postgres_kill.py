"""SIGKILL the embedded postmaster: the supervisor restarts it on the same port and the
federation serves again without restarting any node."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp

from federation.config import ROLES_WITH_SERVICES
from federation.db.embedded import PostmasterPid
from tests.up_support import TEST_MODEL, federation_up

BACK_WITHIN_SECONDS = 10.0
SERVING_AGAIN_WITHIN_SECONDS = 30.0


async def _chat(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.post(url + "/v1/chat/completions",
                            json={"model": TEST_MODEL, "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "hi"}]},
                            headers={"Authorization": f"Bearer {key}"},
                            timeout=aiohttp.ClientTimeout(total=30)) as response:
        await response.read()
        return response.status


async def test_killed_postmaster_is_restarted_on_its_port_and_nodes_recover(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with federation_up(home, tmp_path / "up.log") as up:
        key = await up.issue_key()
        async with aiohttp.ClientSession() as session:
            assert await _chat(session, up.gateway, key) == 200
            dsn = up.endpoints["database"]["dsn"]
            nodes = {role: up.pid(role) for role in (*ROLES_WITH_SERVICES, "gateway")}
            data_dir = (home / "postgres" / "data").resolve()
            before = PostmasterPid.read(data_dir)
            postmaster = up.pid("postgres")
            assert before is not None and before.pid == postmaster

            killed_at = time.monotonic()
            os.kill(postmaster, signal.SIGKILL)
            while not (up.pid("postgres") != postmaster
                       and up.child("postgres")["state"] == "running"):
                assert time.monotonic() - killed_at < BACK_WITHIN_SECONDS, up.output()
                await asyncio.sleep(0.1)
            back = time.monotonic() - killed_at
            after = PostmasterPid.read(data_dir)
            assert after is not None and after.pid == up.pid("postgres")
            assert after.port == before.port
            assert up.endpoints["database"]["dsn"] == dsn
            assert up.endpoints["database"]["pid"] == after.pid

            statuses = []
            while (status := await _chat(session, up.gateway, key)) != 200:
                statuses.append(status)
                assert time.monotonic() - killed_at < SERVING_AGAIN_WITHIN_SECONDS, statuses
                await asyncio.sleep(0.2)
            serving = time.monotonic() - killed_at
            print(f"\npostmaster back after {back:.1f}s, chat 200 again after {serving:.1f}s; "
                  f"meanwhile {statuses}")

        assert {role: up.pid(role) for role in nodes} == nodes, "a node was restarted"
        assert all(up.child(role)["restarts"] == 0 for role in nodes)
        assert up.child("postgres")["restarts"] == 1
        assert up.child("postgres")["last_exit"] == "killed by SIGKILL"
        code, out, err = await up.cli("status")
        assert code == 0, out + err
