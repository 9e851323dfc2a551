"""A wedged inference node's stall stays visible to Prometheus after it restarts.

The node counts the stall in ``federation_inference_stalls_total`` and exits
``stall_exit_after_seconds`` (5 s) later; Prometheus scrapes every 15 s, so the raised
counter of the process that counted it is usually never scraped, and
FederationInferenceStalled (``increase(...[15m]) > 0``) stayed quiet. A real node
wedges here, exits with status 75, and the node started again on the same home
exports the stall from its first scrape.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp
import grpc

from federation.inference.watchdog import EXIT_WEDGED
from federation.v1 import inference_pb2, inference_pb2_grpc
from tests.support import TestPKI


async def _start_node(pki: TestPKI, ready: Path, log: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {
        "FEDERATION_HOME": str(pki.home),
        "FEDERATION_INFERENCE_STALL_TIMEOUT_SECONDS": "1",
        "FEDERATION_INFERENCE_STALL_EXIT_AFTER_SECONDS": "0.5",
        "FEDERATION_INFERENCE_MODELS": json.dumps(
            [{"id": "wedge", "backend": "test", "stall_after_tokens": 1}]),
    }
    ready.unlink(missing_ok=True)
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "node", "--role", "inference",
            "--listen", "127.0.0.1:0", "--metrics-port", "0", "--ready-file", str(ready),
            stdout=out, stderr=out, env=env)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.returncode is None, log.read_text()
        assert time.monotonic() < deadline, "node did not start"
        await asyncio.sleep(0.05)
    return process


async def _stalls(metrics_port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{metrics_port}/metrics") as response:
        text = await response.text()
    return next(line for line in text.splitlines()
                if line.startswith("federation_inference_stalls_total"))


async def _wedge(pki: TestPKI, port: int) -> grpc.StatusCode:
    request = inference_pb2.GenerateRequest(model="wedge", messages=[
        inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content="a b c d")])
    async with pki.channel(f"127.0.0.1:{port}", "gateway") as channel:
        stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(request)
        try:
            async for _ in stream:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_a_restarted_node_still_exports_the_stall_that_ended_it(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "home")
    pki.ca.issue("inference", "local")
    ready, log = tmp_path / "ready.json", tmp_path / "node.log"
    process = await _start_node(pki, ready, log)
    try:
        info = json.loads(ready.read_text())
        assert await _stalls(info["metrics_port"]) == "federation_inference_stalls_total 0.0"
        assert await _wedge(pki, info["grpc_port"]) == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(process.wait(), 20) == EXIT_WEDGED
        # What a supervisor does next: the same node, on the same home.
        process = await _start_node(pki, ready, log)
        info = json.loads(ready.read_text())
        assert await _stalls(info["metrics_port"]) == "federation_inference_stalls_total 1.0"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
