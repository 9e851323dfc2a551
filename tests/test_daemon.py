"""`federation node`: a real daemon process, stopped with SIGTERM mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc

from federation.v1 import inference_pb2, inference_pb2_grpc
from tests.support import TestPKI

TOKEN_DELAY = 0.15
WORDS = 12


async def _start_node(tmp_path: Path, pki: TestPKI, grace: float) -> asyncio.subprocess.Process:
    pki.ca.issue("inference", "local")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {
        "FEDERATION_HOME": str(pki.home),
        "FEDERATION_GRPC_GRACE_SECONDS": str(grace),
        "FEDERATION_INFERENCE_MODELS": json.dumps(
            [{"id": "slow-echo", "backend": "test", "token_delay_seconds": TOKEN_DELAY}]
        ),
    }
    ready = tmp_path / "ready.json"
    log = (tmp_path / "node.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "node", "--role", "inference",
        "--listen", "127.0.0.1:0", "--ready-file", str(ready),
        stdout=log, stderr=log, env=env,
    )
    log.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.returncode is None, (tmp_path / "node.log").read_text()
        assert time.monotonic() < deadline, "node did not start"
        await asyncio.sleep(0.05)
    process.port = json.loads(ready.read_text())["grpc_port"]  # type: ignore[attr-defined]
    return process


def _request() -> inference_pb2.GenerateRequest:
    prompt = " ".join(f"word{i}" for i in range(WORDS))
    return inference_pb2.GenerateRequest(
        model="slow-echo",
        messages=[inference_pb2.ChatMessage(role=inference_pb2.CHAT_ROLE_USER, content=prompt)],
    )


async def test_sigterm_drains_in_flight_stream_then_exits_zero(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "home")
    process = await _start_node(tmp_path, pki, grace=15)
    try:
        async with pki.channel(f"127.0.0.1:{process.port}", "gateway") as channel:  # type: ignore[attr-defined]
            stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(_request())
            deltas: list[str] = []
            finished = None
            async for message in stream:
                if message.HasField("delta"):
                    deltas.append(message.delta.text)
                    if len(deltas) == 1:
                        process.send_signal(signal.SIGTERM)
                else:
                    finished = message.finished
        # The stream that was in flight when SIGTERM arrived ran to its natural end.
        assert finished is not None
        assert finished.finish_reason == inference_pb2.FINISH_REASON_STOP
        assert len(deltas) >= WORDS
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_refuses_new_calls_while_draining(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "home")
    process = await _start_node(tmp_path, pki, grace=15)
    target = f"127.0.0.1:{process.port}"  # type: ignore[attr-defined]
    try:
        async with pki.channel(target, "gateway") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stream = stub.Generate(_request())
            first = await stream.read()
            assert first.HasField("delta")
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with pki.channel(target, "gateway", "late") as late_channel:
                late = inference_pb2_grpc.InferenceServiceStub(late_channel)
                try:
                    await late.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.DEADLINE_EXCEEDED)
                else:
                    raise AssertionError("a new call was accepted after SIGTERM")
            while await stream.read() != grpc.aio.EOF:
                pass
            assert (await stream.code()) == grpc.StatusCode.OK
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
