"""``federation up`` as a real process tree, for the tests that start, break and stop it.

Everything goes through what an operator has: the command, its home
(``endpoints.json``, ``run/supervisor.json``, the logs), the ``federation`` CLI,
the gateway's HTTP API and the nodes' gRPC health with the operator certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.db import embedded_data_dir
from federation.db.embedded import EmbeddedPostgres
from federation.v1 import thermal_memory_pb2 as mpb
from federation.v1 import thermal_memory_pb2_grpc as mgrpc

READY_WITHIN_SECONDS = 60.0
TEST_MODEL = "test-model"
TEST_MODEL_TOML = f"""
[[inference.models]]
id = "{TEST_MODEL}"
backend = "test"
"""
"""The deterministic ``test`` backend: fast, and no model to load (README, "Models")."""


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env["FEDERATION_HOME"] = str(home)
    return env


@dataclass
class RunningUp:
    home: Path
    process: asyncio.subprocess.Process
    log_path: Path
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)

    @property
    def endpoints(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.home / "endpoints.json").read_text())
        return data

    @property
    def supervisor_state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.home / "run" / "supervisor.json").read_text())
        return data

    @property
    def gateway(self) -> str:
        return str(self.endpoints["gateway"]["url"])

    def pid(self, name: str) -> int:
        pid = self.supervisor_state["children"][name]["pid"]
        assert isinstance(pid, int)
        return pid

    def child(self, name: str) -> dict[str, Any]:
        child: dict[str, Any] = self.supervisor_state["children"][name]
        return child

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """``federation ARGS`` against this home: (exit code, stdout, stderr)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def issue_key(self) -> str:
        code, out, err = await self.cli("keys", "issue", "--tenant", "t", "--scope", "chat",
                                        "--token-quota", "1000000")
        assert code == 0, err
        return out.strip()

    async def serving(self, role: str) -> bool:
        """The node's gRPC health, asked with the operator certificate."""
        pki = self.endpoints["pki"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(pki["ca_cert"]).read_bytes(),
            private_key=Path(pki["admin_key"]).read_bytes(),
            certificate_chain=Path(pki["admin_cert"]).read_bytes(),
        )
        async with grpc.aio.secure_channel(self.endpoints["nodes"][role]["grpc"],
                                           creds) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session, session.get(
                self.gateway + "/health") as response:
            return response.status, await response.json()

    async def audited_answers(self) -> Counter[str]:
        """Request ids of the gateway's audit records with status 200 (ThermalMemory API)."""
        pki = self.endpoints["pki"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(pki["ca_cert"]).read_bytes(),
            private_key=Path(pki["admin_key"]).read_bytes(),
            certificate_chain=Path(pki["admin_cert"]).read_bytes())
        found: Counter[str] = Counter()
        async with grpc.aio.secure_channel(self.endpoints["nodes"]["memory"]["grpc"],
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

    def processes(self) -> list[psutil.Process]:
        """The supervisor and every process under it (PostgreSQL's included)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]


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


async def start_up(home: Path, log_path: Path, *, toml: str = TEST_MODEL_TOML,
                   extra_env: Mapping[str, str] | None = None) -> RunningUp:
    """Start ``federation up`` (own process group, so a test can kill the whole group)
    and wait until it reports everything healthy. ``extra_env``: e.g. an external
    ``FEDERATION_DATABASE_URL``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "federation.toml").write_text(toml)
    env = clean_env(home) | dict(extra_env or {})
    log = log_path.open("ab")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "up", "--http-port", "0",
            stdout=log, stderr=log, env=env, start_new_session=True)
    finally:
        log.close()
    running = RunningUp(home, process, log_path, env)
    deadline = time.monotonic() + READY_WITHIN_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
            if running.endpoints["supervisor_pid"] == process.pid:
                return running
        if process.returncode is not None:
            raise AssertionError(f"federation up exited during start-up:\n{running.output()}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"federation up was not healthy within {READY_WITHIN_SECONDS}s:\n"
                         f"{running.output()}")


async def stop_up(running: RunningUp) -> int | None:
    """Ctrl-C, as an operator stops it; SIGKILL of the group if it does not stop."""
    process = running.process
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return process.returncode


def delete_embedded_data(home: Path) -> None:
    """Remove the home's cluster, also where it was relocated (/var/lib/federation/…)."""
    EmbeddedPostgres(embedded_data_dir(home)).delete_cluster()


@contextlib.asynccontextmanager
async def federation_up(home: Path, log_path: Path, *, toml: str = TEST_MODEL_TOML,
                        extra_env: Mapping[str, str] | None = None
                        ) -> AsyncIterator[RunningUp]:
    running = await start_up(home, log_path, toml=toml, extra_env=extra_env)
    try:
        yield running
    finally:
        await stop_up(running)
        delete_embedded_data(home)


async def until(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` holds; fails the test past ``seconds``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def running_processes(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie is not: on these machines PID 1 may never reap it)."""
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.Error:
            continue
    return alive


def ancestor_modes(path: Path) -> dict[str, int]:
    """The mode of every directory from ``/`` down to ``path``."""
    path = path.resolve()
    return {str(p): p.stat().st_mode for p in [*reversed(path.parents), path]}
