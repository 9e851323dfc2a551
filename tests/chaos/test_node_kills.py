"""SIGKILL every node role in turn, then the gateway, while a client keeps chatting.

Each killed process is back (SERVING, same port, a new PID in endpoints.json)
within 10 s; the client only ever sees 200 or 503 (never a 500, and never a
refused connection except while the gateway itself restarts); every 200 it got
has exactly one audit record, and the chain is intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

from federation.config import ROLES_WITH_SERVICES
from tests.up_support import ChatClient, RunningUp, federation_up, until

BACK_WITHIN_SECONDS = 10.0
SERVING_AGAIN_WITHIN_SECONDS = 20.0
"""From the kill to the client's next 200 (the gateway's channel to the node
reconnects with gRPC's own back-off, which may add a few seconds)."""


async def _back_serving(up: RunningUp, role: str, old_pid: int) -> float:
    """Seconds until ``role`` has a new PID in endpoints.json and answers SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < BACK_WITHIN_SECONDS * 2:
        pid = _listed_pid(up, role)
        if pid not in (None, old_pid) and await up.serving(role):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"{role} is not back:\n{up.output()[-3000:]}")


def _listed_pid(up: RunningUp, role: str) -> int | None:
    endpoints = up.endpoints
    entry = endpoints["gateway"] if role == "gateway" else endpoints["nodes"][role]
    pid = entry["pid"]
    return pid if isinstance(pid, int) else None


async def test_every_role_killed_in_turn_comes_back_and_nothing_answered_is_unaudited(
        tmp_path: Path) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log") as up:
        client = ChatClient(up.gateway, await up.issue_key())
        chatting = asyncio.create_task(client.run())
        timings: dict[str, tuple[float, float]] = {}
        try:
            await until(lambda: client.ok_since(0), 20)
            for role in (*ROLES_WITH_SERVICES, "gateway"):
                old_pid = _listed_pid(up, role)
                assert old_pid is not None
                killed_at = gateway_killed_at = time.monotonic()
                os.kill(old_pid, signal.SIGKILL)
                back = await _back_serving(up, role, old_pid) if role != "gateway" else \
                    await until(lambda r=role, p=old_pid: _listed_pid(up, r) not in (None, p),
                                 BACK_WITHIN_SECONDS)
                assert back < BACK_WITHIN_SECONDS, (role, back)
                # A response already on its way when the signal landed proves nothing:
                # for the gateway, wait for one its successor answered.
                since = killed_at + (back if role == "gateway" else 0.0)
                ok = await until(lambda t=since: client.ok_since(t),
                                  SERVING_AGAIN_WITHIN_SECONDS)
                timings[role] = (back, since - killed_at + ok)
        finally:
            client.stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await chatting
        print("\nback SERVING / client's next 200, seconds after SIGKILL:",
              {role: f"{b:.1f}/{o:.1f}" for role, (b, o) in timings.items()})

        statuses = Counter(status for _, status, _ in client.outcomes)
        print("client outcomes:", dict(statuses))
        # The gateway is the one front door: while it restarts, connections are refused.
        gateway_down = (gateway_killed_at, gateway_killed_at + timings["gateway"][1])
        unexpected = [o for o in client.outcomes if o[1] not in (200, 503)
                      and not gateway_down[0] <= o[0] <= gateway_down[1]]
        assert unexpected == [], unexpected[:5]

        roles = (*ROLES_WITH_SERVICES, "gateway")
        await until(lambda: all(up.child(r)["state"] == "running" for r in roles), 10)
        for role in roles:
            child = up.child(role)
            assert child["state"] == "running" and child["restarts"] == 1, (role, child)
            assert child["last_exit"] == "killed by SIGKILL"

        answered = [detail for _, status, detail in client.outcomes if status == 200]
        audited = await up.audited_answers()
        missing = [request_id for request_id in answered if audited[request_id] != 1]
        assert missing == [], f"{len(missing)} of {len(answered)} answers without exactly " \
                              f"one audit record: {missing[:5]}"
        code, out, err = await up.cli("audit", "verify")
        assert code == 0 and "intact" in out, out + err
