"""Runbook drill: inference wedged (docs/runbooks/inference-wedged.md).

``federation up`` runs one inference node serving ``test-model`` and ``wedge-model``
(whose generations stop after two tokens and never end, as on a hung GPU); a second
inference node, started beside it and listed in ``[peers] inference``, serves
``test-model`` only. While a client keeps chatting with ``test-model``, one streamed
``wedge-model`` request stalls. The page promises: that stream gets an error event
naming the stall; the wedged node goes NOT_SERVING and exits (status 75); the
supervisor restarts it; every other request is answered 200 (by the healthy node
while the wedged one drains); the gateway counts the stream error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from federation.inference.watchdog import EXIT_WEDGED
from tests.up_support import ChatClient, clean_env, federation_up, until

STALL_SECONDS = 2.0
EXIT_AFTER_SECONDS = 4.0


def _toml(spare_port: int) -> str:
    return f"""
[inference]
stall_timeout_seconds = {STALL_SECONDS}
stall_exit_after_seconds = {EXIT_AFTER_SECONDS}

[[inference.models]]
id = "test-model"
backend = "test"

[[inference.models]]
id = "wedge-model"
backend = "test"
stall_after_tokens = 2

[peers]
inference = "127.0.0.1:{spare_port}"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(home: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "federation.cli", *args], env=clean_env(home),
                   check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def spare_inference_node(home: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A second inference node (identity ``spare``) serving ``test-model`` only."""
    env = clean_env(home) | {
        "FEDERATION_NODE_NAME": "spare",
        "FEDERATION_INFERENCE_MODELS": json.dumps([{"id": "test-model", "backend": "test"}]),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "federation.cli", "node", "--role", "inference",
             "--listen", f"127.0.0.1:{port}", "--metrics-port", "0"],
            env=env, stdout=out, stderr=out)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _stream_until_error(gateway: str, key: str) -> tuple[list[str], float]:
    """The events of one streamed ``wedge-model`` request, and how long it took."""
    body = {"model": "wedge-model", "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "one two three four five"}]}
    events: list[str] = []
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.post(
            gateway + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=aiohttp.ClientTimeout(total=60)) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
    return events, time.monotonic() - started


async def test_a_wedged_generation_drains_and_restarts_its_node(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _cli(home, "pki", "init")
    _cli(home, "pki", "issue", "--role", "inference", "--name", "spare")
    spare_port = _free_port()
    with spare_inference_node(home, spare_port, tmp_path / "spare.log"):
        async with federation_up(home, tmp_path / "up.log", toml=_toml(spare_port)) as up:
            await until_two_inference_nodes_serve(up.health)
            old_pid = up.pid("inference")
            client = ChatClient(up.gateway, await up.issue_key())
            chatting = asyncio.create_task(client.run())
            try:
                await until(lambda: client.ok_since(0), 20)
                events, took = await _stream_until_error(up.gateway, await up.issue_key())
                restarted = await until(
                    lambda: up.child("inference")["restarts"] == 1
                    and up.child("inference")["state"] == "running", 30)
                assert await up.serving("inference")
                back_at = time.monotonic()
                await until(lambda: client.ok_since(back_at), 10)
            finally:
                client.stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await chatting

            # The wedged stream: a couple of tokens, then one error event naming the
            # stall, then [DONE]; within the stall timeout plus the router's margin.
            errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
            assert len(errors) == 1, events
            assert errors[0]["type"] == "service_unavailable"
            assert "stalled" in errors[0]["message"], errors[0]
            assert events[-1] == "[DONE]"
            assert took < STALL_SECONDS + 10, took

            # The node left with the wedge's status and was restarted on its port.
            child = up.child("inference")
            assert child["last_exit"] == f"exit status {EXIT_WEDGED}", child
            assert up.pid("inference") != old_pid
            log = (home / "logs" / "inference.log").read_text()
            assert "inference wedged" in log and "exiting: the node is wedged" in log

            # Nobody else noticed: every other request was answered.
            statuses = Counter(status for _, status, _ in client.outcomes)
            assert set(statuses) == {200}, statuses
            metrics = await _text(up.gateway + "/metrics")
            assert 'federation_gateway_stream_errors_total{code="unavailable",' \
                   'model="wedge-model"} 1.0' in metrics
    print(f"\nerror event after {took:.1f}s; restarted after {restarted:.1f}s more; "
          f"other requests {dict(statuses)}")


async def until_two_inference_nodes_serve(health: object) -> None:
    async def both() -> bool:
        _, body = await health()  # type: ignore[operator]
        nodes = body["components"]["inference"]["nodes"]
        return len(nodes) == 2 and all(n["status"] == "serving" for n in nodes)

    deadline = time.monotonic() + 30
    while not await both():
        if time.monotonic() > deadline:
            pytest.fail("the second inference node is not serving")
        await asyncio.sleep(0.2)


async def _text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()
