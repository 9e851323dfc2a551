"""`federation up` as a newcomer runs it: everything healthy, everything gone after Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.config import ROLES_WITH_SERVICES

READY_WITHIN_SECONDS = 30.0


async def _wait_for_endpoints(path: Path, process: asyncio.subprocess.Process) -> dict:
    deadline = time.monotonic() + READY_WITHIN_SECONDS
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        assert process.returncode is None, "federation up exited during start-up"
        await asyncio.sleep(0.1)
    raise AssertionError(f"federation up was not healthy within {READY_WITHIN_SECONDS}s")


async def _node_health(target: str, endpoints: dict) -> int:
    pki = endpoints["pki"]
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(pki["ca_cert"]).read_bytes(),
        private_key=Path(pki["admin_key"]).read_bytes(),
        certificate_chain=Path(pki["admin_cert"]).read_bytes(),
    )
    async with grpc.aio.secure_channel(target, creds) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


async def test_up_serves_every_role_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env["FEDERATION_HOME"] = str(home)
    log = (tmp_path / "up.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "up", "--http-port", "0",
        stdout=log, stderr=log, env=env,
    )
    try:
        endpoints = await _wait_for_endpoints(home / "endpoints.json", process)
        assert set(endpoints["nodes"]) == set(ROLES_WITH_SERVICES)
        assert endpoints["database"]["embedded"] is True
        assert (os.stat(home / "endpoints.json").st_mode & 0o777) == 0o600

        async with aiohttp.ClientSession() as session:
            async with session.get(endpoints["gateway"]["url"] + "/health") as resp:
                health = await resp.json()
                assert resp.status == 200, health
            for role, node in endpoints["nodes"].items():
                assert await _node_health(node["grpc"], endpoints) == (
                    health_pb2.HealthCheckResponse.SERVING
                ), role
                async with session.get(node["metrics"]) as resp:
                    assert resp.status == 200
                    assert "federation_grpc_server" in await resp.text()
        listed = json.dumps(health)
        for role in ROLES_WITH_SERVICES:
            assert role in listed, f"/health does not list {role}: {health}"

        pids = [n["pid"] for n in endpoints["nodes"].values()] + [endpoints["gateway"]["pid"]]
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()

    assert not (home / "endpoints.json").exists()
    assert not (home / "postgres" / "data" / "postmaster.pid").exists()
    survivors = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert survivors == [], f"processes left running: {survivors}"
    output = (tmp_path / "up.log").read_text()
    assert "Traceback" not in output, output
