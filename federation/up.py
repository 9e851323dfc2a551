"""``federation up``: the whole federation on one machine.

Creates the PKI if missing, starts PostgreSQL (embedded unless a URL is
given), applies migrations, starts every node role and the HTTP gateway as
separate processes talking mTLS gRPC, waits until all are healthy, prints and
writes ``endpoints.json``, and on Ctrl-C (or SIGTERM) stops everything in
reverse order, leaving nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import asyncpg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.cli_support import ADMIN_NAME, CommandError
from federation.config import ROLES_WITH_SERVICES, Settings
from federation.db import embedded_data_dir, ensure_database
from federation.db.embedded import DATABASE, EmbeddedPostgres
from federation.db.migrate import apply_migrations
from federation.pki import (
    CertificateAuthority,
    CertificateFiles,
    PKIPaths,
    ensure_identity,
    load_ca,
    write_private_file,
)

GATEWAY = "gateway"
_STOP_ORDER_TIMEOUT = 5.0


@dataclass
class Child:
    """One process the supervisor started."""

    role: str
    argv: list[str]
    log_path: Path
    ready_file: Path
    process: asyncio.subprocess.Process | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


class Progress:
    """Human progress lines on stderr: what is being done, what is done, how long it took."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._started = time.monotonic()

    def step(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        print(f"[{elapsed:5.1f}s] {message}", file=self._stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started


class Federation:
    """The supervisor's state; ``start()`` then ``stop()``."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.progress = progress
        self.children: dict[str, Child] = {}
        self.embedded: EmbeddedPostgres | None = None
        self.database_url = settings.database.url
        self.admin: CertificateFiles | None = None
        self.ports: dict[str, int] = {}
        self.http_port = 0
        self.env: dict[str, str] = {}

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "run").mkdir(exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        ca = self._ensure_pki()
        await self._start_database()
        self._allocate_ports()
        self.env = self._child_env()
        nodes = []
        for role in ROLES_WITH_SERVICES:
            ensure_identity(ca, role, self.settings.node_name)
            nodes.append(self._new_child(role, self._node_argv(role)))
        # Nodes start in parallel: each finds its peers lazily, at first call.
        await asyncio.gather(*(self._launch(child) for child in nodes))
        await asyncio.gather(*(self._wait_node(child) for child in nodes))
        ensure_identity(ca, GATEWAY, self.settings.node_name)
        gateway = self._new_child(GATEWAY, self._gateway_argv())
        await self._launch(gateway)
        await self._wait_gateway(gateway)

    def _ensure_pki(self) -> CertificateAuthority:
        paths = PKIPaths(self.home)
        if paths.ca_cert.exists():
            ca = load_ca(self.home, self.settings.trust_domain)
            self.progress.step(f"PKI: using the federation CA at {paths.ca_cert}")
        else:
            ca = CertificateAuthority.init(self.home, self.settings.trust_domain)
            self.progress.step(f"PKI: created a federation CA at {paths.ca_cert}")
        self.admin = ensure_identity(ca, "admin", ADMIN_NAME)
        return ca

    async def _start_database(self) -> None:
        if self.database_url:
            self.progress.step("PostgreSQL: using FEDERATION_DATABASE_URL")
        else:
            self.progress.step("PostgreSQL: starting the embedded server")
            self.embedded = EmbeddedPostgres(
                embedded_data_dir(self.home), port=self.settings.database.embedded_port
            )
            dsn = await asyncio.to_thread(self.embedded.start)
            await ensure_database(dsn.url("postgres"), DATABASE)
            self.database_url = dsn.url()
            self.progress.step(f"PostgreSQL: embedded server on {dsn.host}:{dsn.port}")
        conn = await asyncpg.connect(self.database_url)
        try:
            applied = await apply_migrations(conn)
        finally:
            await conn.close()
        self.progress.step(f"PostgreSQL: schema up to date ({len(applied)} migrations applied now)")

    def _allocate_ports(self) -> None:
        host = self.settings.nodes.host
        for role in ROLES_WITH_SERVICES:
            self.ports[role] = self.settings.port_for(role) or _free_port(host)
        self.http_port = self.settings.gateway.http_port
        if self.http_port and not _port_is_free(self.settings.gateway.http_host, self.http_port):
            raise CommandError(
                f"port {self.http_port} is already in use; choose another with --http-port "
                "(0 picks a free one)"
            )
        self.http_port = self.http_port or _free_port(self.settings.gateway.http_host)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FEDERATION_HOME"] = str(self.home)
        env["FEDERATION_DATABASE_URL"] = self.database_url
        host = self.settings.nodes.host
        for role in ROLES_WITH_SERVICES:
            env[f"FEDERATION_PEERS_{role.upper()}"] = f"{host}:{self.ports[role]}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _base_argv(self) -> list[str]:
        return [sys.executable, "-m", "federation.cli", "--home", str(self.home)]

    def _node_argv(self, role: str) -> list[str]:
        return [
            *self._base_argv(),
            "node",
            "--role",
            role,
            "--listen",
            f"{self.settings.nodes.host}:{self.ports[role]}",
            "--metrics-port",
            "0",
            "--ready-file",
            str(self._ready_file(role)),
        ]

    def _gateway_argv(self) -> list[str]:
        return [
            *self._base_argv(),
            "gateway",
            "--http-host",
            self.settings.gateway.http_host,
            "--http-port",
            str(self.http_port),
            "--ready-file",
            str(self._ready_file(GATEWAY)),
        ]

    def _ready_file(self, role: str) -> Path:
        return self.home / "run" / f"{role}.json"

    def _new_child(self, role: str, argv: list[str]) -> Child:
        child = Child(role, argv, self.home / "logs" / f"{role}.log", self._ready_file(role))
        child.ready_file.unlink(missing_ok=True)
        self.children[role] = child
        return child

    async def _launch(self, child: Child) -> None:
        log = open(child.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            child.process = await asyncio.create_subprocess_exec(
                *child.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                # Own process group: Ctrl-C reaches only the supervisor, which then
                # stops the children in order.
                start_new_session=True,
            )
        finally:
            log.close()

    async def _wait_node(self, child: Child) -> None:
        deadline = time.monotonic() + self.settings.nodes.startup_timeout_seconds
        child.info = await self._wait_ready_file(child, deadline)
        await self._wait_serving(child, deadline)
        self.progress.step(
            f"{child.role:<9} serving on {self.settings.nodes.host}:{child.info['grpc_port']} "
            f"(metrics :{child.info['metrics_port']}, pid {child.info['pid']})"
        )

    async def _wait_ready_file(self, child: Child, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            if child.ready_file.exists():
                info: dict[str, Any] = json.loads(child.ready_file.read_text())
                return info
            if not child.running:
                raise CommandError(
                    f"the {child.role} process exited during start-up "
                    f"(log {child.log_path}):\n{child.log_tail()}"
                )
            await asyncio.sleep(0.05)
        raise CommandError(f"the {child.role} node did not start in time (log {child.log_path})")

    async def _wait_serving(self, child: Child, deadline: float) -> None:
        assert self.admin is not None
        target = f"{self.settings.nodes.host}:{child.info['grpc_port']}"
        async with secure_channel(target, self.admin, self.settings.grpc) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        raise CommandError(f"the {child.role} node is not healthy: {exc}") from exc
                await asyncio.sleep(0.1)

    async def _wait_gateway(self, child: Child) -> None:
        deadline = time.monotonic() + self.settings.nodes.startup_timeout_seconds
        child.info = await self._wait_ready_file(child, deadline)
        url = f"http://{self.settings.gateway.http_host}:{child.info['http_port']}/health"
        last = ""
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        last = f"HTTP {resp.status}: {await resp.text()}"
                        if resp.status == 200:
                            self.progress.step(
                                f"{GATEWAY:<9} serving on {self.gateway_url} (pid "
                                f"{child.info['pid']})"
                            )
                            return
                except aiohttp.ClientError as exc:
                    last = str(exc)
                if not child.running:
                    break
                await asyncio.sleep(0.2)
        raise CommandError(
            f"the gateway did not become healthy ({last}); log {child.log_path}:\n"
            f"{child.log_tail()}"
        )

    @property
    def gateway_url(self) -> str:
        port = self.children[GATEWAY].info.get("http_port", self.http_port)
        return f"http://{self.settings.gateway.http_host}:{port}"

    # -- report --------------------------------------------------------------

    def endpoints(self) -> dict[str, Any]:
        assert self.admin is not None
        host = self.settings.nodes.host
        nodes = {
            role: {
                "grpc": f"{host}:{child.info['grpc_port']}",
                "metrics": f"http://{self.settings.nodes.metrics_host}:"
                f"{child.info['metrics_port']}/metrics",
                "pid": child.info["pid"],
                "log": str(child.log_path),
            }
            for role, child in self.children.items()
            if role != GATEWAY
        }
        for role, child in self.children.items():
            if "enrollment_port" in child.info:  # the broker's port for Enroll
                nodes[role]["enrollment"] = f"{host}:{child.info['enrollment_port']}"
        return {
            "home": str(self.home),
            "gateway": {
                "url": self.gateway_url,
                "openai_base_url": self.gateway_url + "/v1",
                "pid": self.children[GATEWAY].info.get("pid"),
                "log": str(self.children[GATEWAY].log_path),
            },
            "nodes": nodes,
            "database": {"dsn": self.database_url, "embedded": self.embedded is not None},
            "pki": {
                "ca_cert": str(self.admin.ca_cert.resolve()),
                "admin_cert": str(self.admin.cert.resolve()),
                "admin_key": str(self.admin.key.resolve()),
            },
            "supervisor_pid": os.getpid(),
        }

    def write_endpoints(self) -> dict[str, Any]:
        data = self.endpoints()
        # 0600: the file holds the database DSN with its password.
        write_private_file(
            self.settings.endpoints_file.resolve(), json.dumps(data, indent=2).encode()
        )
        return data

    def first_exited_child(self) -> Child | None:
        return next((c for c in self.children.values() if c.process and not c.running), None)

    # -- stop ----------------------------------------------------------------

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.settings.endpoints_file.resolve().unlink()
        grace = self.settings.grpc.grace_seconds + _STOP_ORDER_TIMEOUT
        # Front door first, then the nodes that call others, then the ones they call.
        order = [GATEWAY, "council", "inference", "broker", "guardian", "keys", "memory"]
        for role in order:
            child = self.children.get(role)
            if child is not None:
                await _terminate(child, grace)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.progress.step("PostgreSQL: embedded server stopped")


async def _terminate(child: Child, grace: float) -> None:
    if child.process is not None:
        await terminate(child.process, grace)


async def terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM (a node's graceful stop), then SIGKILL if it has not exited in ``grace``."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):  # exited since the check
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        process.kill()
        await process.wait()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _print_summary(data: dict[str, Any], elapsed: float, stream: TextIO) -> None:
    print(f"\nFederation is up in {elapsed:.1f}s (home {data['home']})", file=stream)
    print(
        f"  gateway   {data['gateway']['url']}  "
        f"(OpenAI base URL {data['gateway']['openai_base_url']})",
        file=stream,
    )
    for role, node in data["nodes"].items():
        print(f"  {role:<9} grpc {node['grpc']}  metrics {node['metrics']}", file=stream)
    print(
        f"  database  {'embedded' if data['database']['embedded'] else 'external'} PostgreSQL",
        file=stream,
    )
    print(f"  endpoints written to {Path(data['home']) / 'endpoints.json'}", file=stream)
    print("Press Ctrl-C to stop.", file=stream, flush=True)


async def run_federation(settings: Settings, *, json_output: bool = False) -> int:
    """Run until Ctrl-C/SIGTERM or until a component dies; stop everything either way."""
    progress = Progress()
    federation = Federation(settings, progress)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        start = asyncio.create_task(federation.start())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, CommandError):
                await start
            progress.step("interrupted during start-up")
            return 130
        stopper.cancel()
        start.result()
        data = federation.write_endpoints()
        if json_output:
            print(json.dumps(data, indent=2), flush=True)
        _print_summary(data, progress.elapsed, sys.stderr)
        exit_code = await _watch(federation, stop)
    finally:
        progress.step("stopping the federation")
        await federation.stop()
        progress.step("stopped")
    return exit_code


async def _watch(federation: Federation, stop: asyncio.Event) -> int:
    while not stop.is_set():
        dead = federation.first_exited_child()
        if dead is not None:
            federation.progress.step(
                f"the {dead.role} process exited unexpectedly; stopping everything. "
                f"Its log ({dead.log_path}):\n{dead.log_tail()}"
            )
            return 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    return 0
