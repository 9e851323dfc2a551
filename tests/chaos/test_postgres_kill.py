"""SIGKILL the embedded postmaster while a client keeps chatting: the supervisor restarts it
on the same port, the federation serves again without restarting any node, the client
only ever sees 200 or 503, and every 200 it got is audited."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

from federation.config import ROLES_WITH_SERVICES
from federation.db.postmaster import PostmasterPid
from tests.up_support import ChatClient, federation_up, until

BACK_WITHIN_SECONDS = 10.0
SERVING_AGAIN_WITHIN_SECONDS = 30.0


async def test_killed_postmaster_is_restarted_on_its_port_and_nodes_recover(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    async with federation_up(home, tmp_path / "up.log") as up:
        client = ChatClient(up.gateway, await up.issue_key())
        chatting = asyncio.create_task(client.run())
        try:
            await until(lambda: client.ok_since(0), 20)
            dsn = up.endpoints["database"]["dsn"]
            nodes = {role: up.pid(role) for role in (*ROLES_WITH_SERVICES, "gateway")}
            data_dir = (home / "postgres" / "data").resolve()
            before = PostmasterPid.read(data_dir)
            postmaster = up.pid("postgres")
            assert before is not None and before.pid == postmaster

            os.kill(postmaster, signal.SIGKILL)
            # State first: while it waits for its restart, no PID is listed.
            back = await until(lambda: up.child("postgres")["state"] == "running"
                               and up.pid("postgres") != postmaster,
                               BACK_WITHIN_SECONDS)
            after = PostmasterPid.read(data_dir)
            assert after is not None and after.pid == up.pid("postgres")
            assert after.port == before.port
            assert up.endpoints["database"]["dsn"] == dsn
            assert up.endpoints["database"]["pid"] == after.pid

            ready_at = time.monotonic()
            serving = back + await until(lambda: client.ok_since(ready_at),
                                         SERVING_AGAIN_WITHIN_SECONDS)
        finally:
            client.stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await chatting
        statuses = Counter(status for _, status, _ in client.outcomes)
        print(f"\npostmaster back after {back:.1f}s, chat 200 again after {serving:.1f}s; "
              f"client outcomes {dict(statuses)}")
        unexpected = [o for o in client.outcomes if o[1] not in (200, 503)]
        assert unexpected == [], unexpected[:5]

        assert {role: up.pid(role) for role in nodes} == nodes, "a node was restarted"
        assert all(up.child(role)["restarts"] == 0 for role in nodes)
        assert up.child("postgres")["restarts"] == 1
        assert up.child("postgres")["last_exit"] == "killed by SIGKILL"
        answered = [detail for _, status, detail in client.outcomes if status == 200]
        audited = await up.audited_answers()
        assert [r for r in answered if audited[r] != 1] == []
        code, out, err = await up.cli("status")
        assert code == 0, out + err
        code, out, err = await up.cli("audit", "verify")
        assert code == 0 and "intact" in out, out + err
