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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from federation.config import ROLES_WITH_SERVICES
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc
from tests.up_support import TEST_MODEL, RunningUp, federation_up

BACK_WITHIN_SECONDS = 10.0
SERVING_AGAIN_WITHIN_SECONDS = 20.0
"""From the kill to the client's next 200 (the gateway's channel to the node
reconnects with gRPC's own back-off, which may add a few seconds)."""


@dataclass
class ChatClient:
    """Sequential chat completions against the gateway until stopped."""

    url: str
    key: str
    outcomes: list[tuple[float, int | str, str]] = field(default_factory=list)
    """(time, HTTP status or the connection error, x-request-id or body)."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        body = {"model": TEST_MODEL, "max_tokens": 8,
                "messages": [{"role": "user", "content": "hello"}]}
        headers = {"Authorization": f"Bearer {self.key}"}
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                try:
                    async with session.post(self.url + "/v1/chat/completions", json=body,
                                            headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
                        text = await resp.text()
                        detail = resp.headers.get("x-request-id", "") if resp.status == 200 \
                            else text[:300]
                        self.outcomes.append((time.monotonic(), resp.status, detail))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.outcomes.append((time.monotonic(), type(exc).__name__, str(exc)))
                await asyncio.sleep(0.02)

    def ok_since(self, moment: float) -> bool:
        return any(at > moment and status == 200 for at, status, _ in self.outcomes)


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


async def _until(condition: object, seconds: float) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _gateway_audit(up: RunningUp) -> Counter[str]:
    """Request ids of the gateway's audit records with status 200 (ThermalMemory API)."""
    pki = up.endpoints["pki"]
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(pki["ca_cert"]).read_bytes(),
        private_key=Path(pki["admin_key"]).read_bytes(),
        certificate_chain=Path(pki["admin_cert"]).read_bytes())
    found: Counter[str] = Counter()
    async with grpc.aio.secure_channel(up.endpoints["nodes"]["memory"]["grpc"],
                                       creds) as channel:
        stub = mgrpc.ThermalMemoryServiceStub(channel)
        token = ""
        while True:
            page = await stub.SearchMemory(mpb.SearchMemoryRequest(
                tenant_id="t", action_prefix="gateway.request", page_size=1000,
                page_token=token), timeout=30)
            for record in page.records:
                if record.payload.attributes.get("status") == "200":
                    found[record.payload.attributes["request_id"]] += 1
            token = page.next_page_token
            if not token:
                return found


async def test_every_role_killed_in_turn_comes_back_and_nothing_answered_is_unaudited(
        tmp_path: Path) -> None:
    async with federation_up(tmp_path / "home", tmp_path / "up.log") as up:
        client = ChatClient(up.gateway, await up.issue_key())
        chatting = asyncio.create_task(client.run())
        timings: dict[str, tuple[float, float]] = {}
        try:
            await _until(lambda: client.ok_since(0), 20)
            for role in (*ROLES_WITH_SERVICES, "gateway"):
                old_pid = _listed_pid(up, role)
                assert old_pid is not None
                killed_at = gateway_killed_at = time.monotonic()
                os.kill(old_pid, signal.SIGKILL)
                back = await _back_serving(up, role, old_pid) if role != "gateway" else \
                    await _until(lambda r=role, p=old_pid: _listed_pid(up, r) not in (None, p),
                                 BACK_WITHIN_SECONDS)
                assert back < BACK_WITHIN_SECONDS, (role, back)
                # A response already on its way when the signal landed proves nothing:
                # for the gateway, wait for one its successor answered.
                since = killed_at + (back if role == "gateway" else 0.0)
                ok = await _until(lambda t=since: client.ok_since(t),
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
        await _until(lambda: all(up.child(r)["state"] == "running" for r in roles), 10)
        for role in roles:
            child = up.child(role)
            assert child["state"] == "running" and child["restarts"] == 1, (role, child)
            assert child["last_exit"] == "killed by SIGKILL"

        answered = [detail for _, status, detail in client.outcomes if status == 200]
        audited = await _gateway_audit(up)
        missing = [request_id for request_id in answered if audited[request_id] != 1]
        assert missing == [], f"{len(missing)} of {len(answered)} answers without exactly " \
                              f"one audit record: {missing[:5]}"
        code, out, err = await up.cli("audit", "verify")
        assert code == 0 and "intact" in out, out + err
