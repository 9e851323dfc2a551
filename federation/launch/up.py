"""``federation up``: the whole federation on one machine, supervised.

Takes the home's lock (one supervisor per home; a second ``federation up`` is
refused with the first one's PID), stops whatever a dead supervisor left
behind, creates the PKI if missing, starts PostgreSQL (embedded unless a URL is
given) as a supervised foreground child, applies migrations, starts every node
role and the HTTP gateway as separate processes talking mTLS gRPC, waits until
all are healthy, and prints and writes ``endpoints.json``.

Then it supervises (:mod:`federation.launch.supervisor`): a child that exits is
restarted on the same ports with exponential back-off; a crash loop is reported
and that child marked ``failed`` while the others keep running. Every change is
written to ``run/supervisor.json`` (read by ``GET /health`` and ``federation
status``), and ``endpoints.json`` follows each new PID. Children never outlive
the supervisor (:mod:`federation.launch.lifeline`). Ctrl-C (or SIGTERM) stops
everything in reverse order, PostgreSQL last with a fast shutdown; a second one
during that stop ends every child still running at once.
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
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.config import ROLES_WITH_SERVICES, Settings
from federation.db import connect, embedded_data_dir, ensure_database
from federation.db.embedded import DATABASE, EmbeddedPostgres
from federation.db.migrate import apply_migrations
from federation.errors import CommandError
from federation.launch.children import (
    GATEWAY,
    POSTGRES,
    GatewayChild,
    NodeChild,
    PostgresChild,
    Progress,
)
from federation.launch.lifeline import Lifeline
from federation.launch.state import (
    ChildState,
    SupervisorState,
    process_start_time,
    write_state,
)
from federation.launch.supervisor import HomeLock, Supervised, clean_up_previous
from federation.pki import (
    ADMIN_NAME,
    CertificateAuthority,
    CertificateFiles,
    PKIPaths,
    ensure_identity,
    load_ca,
    write_private_file,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, a service manager's stop, and the terminal going away (its window closed, an
ssh session lost): each stops the federation gracefully. SIGHUP's default action would
end the supervisor at once, leaving its children to the lifeline's short orphan stop
and its state file saying "running"."""

STOP_ORDER = (GATEWAY, "council", "inference", "broker", "guardian", "keys", "memory", POSTGRES)
"""Front door first, then the nodes that call others, then the ones they call, then
the database."""

# -- the federation ----------------------------------------------------------------


class Federation:
    """The supervisor's state; ``start()``, ``watch()``, then ``stop()``."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.progress = progress
        self.children: dict[str, Supervised] = {}
        self.embedded: EmbeddedPostgres | None = None
        self.database_url = settings.database.url
        self.admin: CertificateFiles | None = None
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.http_port = 0
        self.env: dict[str, str] = {}
        self.lifeline = Lifeline()
        pid = os.getpid()
        self.state = SupervisorState(pid, process_start_time(pid) or time.time())
        self._endpoints_written = False

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        for directory in (self.home, self.home / "run", self.home / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
        ca = self._ensure_pki()
        await self._start_database()
        self._allocate_ports()
        self.env = self._child_env()
        nodes = []
        for role in ROLES_WITH_SERVICES:
            ensure_identity(ca, role, self.settings.node_name)
            nodes.append(self._supervise(NodeChild(self, role, self._node_argv(role))))
        # Nodes start in parallel: each finds its peers lazily, at first call.
        await asyncio.gather(*(child.start() for child in nodes))
        ensure_identity(ca, GATEWAY, self.settings.node_name)
        await self._supervise(GatewayChild(self, GATEWAY, self._gateway_argv())).start()

    def watch(self) -> None:
        """From now on, restart every child that exits."""
        for child in self.children.values():
            child.watch()

    def _supervise(self, spec: Any) -> Supervised:
        child = Supervised(spec, self.settings.supervisor, self.children_changed,
                           self.progress.step)
        self.children[spec.name] = child
        self.state.children[spec.name] = child.status
        return child

    def _ensure_pki(self) -> CertificateAuthority:
        paths = PKIPaths(self.home)
        if paths.ca_cert.exists():
            ca = load_ca(self.home, self.settings.trust_domain, self.settings.pki)
            self.progress.step(f"PKI: using the federation CA at {paths.ca_cert}")
        else:
            ca = CertificateAuthority.init(self.home, self.settings.trust_domain,
                                           config=self.settings.pki)
            self.progress.step(f"PKI: created a root CA and two intermediates under "
                               f"{paths.directory}")
        self.admin = ensure_identity(ca, "admin", ADMIN_NAME)
        return ca

    async def _start_database(self) -> None:
        if self.database_url:
            self.progress.step("PostgreSQL: using FEDERATION_DATABASE_URL")
        else:
            self.progress.step("PostgreSQL: starting the embedded server")
            self.embedded = EmbeddedPostgres(
                embedded_data_dir(self.home), port=self.settings.database.embedded_port,
                log_file=self.home / "logs" / "postgres.log")
            # initdb and the other one-off commands may run in a thread; the postmaster
            # itself is spawned on this (the event loop's) thread, see federation.launch.lifeline.
            dsn = await asyncio.to_thread(self.embedded.prepare)
            await self._supervise(PostgresChild(self, self.embedded)).start()
            await ensure_database(dsn.url("postgres"), DATABASE)
            self.database_url = dsn.url()
        conn = await connect(self.database_url, self.settings.database)
        try:
            applied = await apply_migrations(conn)
        finally:
            await conn.close()
        self.progress.step(f"PostgreSQL: schema up to date ({len(applied)} migrations applied now)")

    def _allocate_ports(self) -> None:
        """Every port is fixed before the first start, so a restarted child listens where
        its peers, Prometheus and enrolled devices expect it."""
        host = self.settings.nodes.host
        self.http_port = self.settings.gateway.http_port
        if self.http_port and not _port_is_free(self.settings.gateway.http_host, self.http_port):
            raise CommandError(
                f"port {self.http_port} is already in use; choose another with --http-port "
                "(0 picks a free one)"
            )
        with _FreePorts() as free:
            for role in ROLES_WITH_SERVICES:
                self.ports[role] = self.settings.port_for(role) or free.pick(host)
                self.metrics_ports[role] = (self.settings.nodes.metrics_port_for(role)
                                            or free.pick(self.settings.nodes.metrics_host))
            self.ports["enrollment"] = self.settings.edge.enrollment_port or free.pick(host)
            self.http_port = self.http_port or free.pick(self.settings.gateway.http_host)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FEDERATION_HOME"] = str(self.home)
        env["FEDERATION_DATABASE_URL"] = self.database_url
        host = self.settings.nodes.host
        for role in ROLES_WITH_SERVICES:
            env[f"FEDERATION_PEERS_{role.upper()}"] = f"{host}:{self.ports[role]}"
        # Inference nodes started elsewhere (``[peers] inference`` in federation.toml, e.g.
        # a GPU box) serve beside the one started here: the gateway routes across all.
        own = env["FEDERATION_PEERS_INFERENCE"]
        others = [a for a in self.settings.peers.addresses("inference") if a != own]
        env["FEDERATION_PEERS_INFERENCE"] = ",".join([own, *others])
        env["FEDERATION_EDGE_ENROLLMENT_PORT"] = str(self.ports["enrollment"])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _base_argv(self) -> list[str]:
        # The log level goes as a flag: given as one to `federation up` it would otherwise
        # be lost, the children reading the environment's or the file's.
        return [sys.executable, "-m", "federation.cli", "--home", str(self.home),
                "--log-level", self.settings.log_level.upper()]

    def _node_argv(self, role: str) -> list[str]:
        return [
            *self._base_argv(),
            "node",
            "--role",
            role,
            "--listen",
            f"{self.settings.nodes.host}:{self.ports[role]}",
            "--metrics-port",
            str(self.metrics_ports[role]),
        ]

    def _gateway_argv(self) -> list[str]:
        return [
            *self._base_argv(),
            "gateway",
            "--http-host",
            self.settings.gateway.http_host,
            "--http-port",
            str(self.http_port),
        ]

    async def wait_serving(self, role: str, port: int, deadline: float) -> None:
        assert self.admin is not None
        target = f"{self.settings.nodes.host}:{port}"
        async with secure_channel(target, self.admin, self.settings.grpc) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        raise CommandError(f"the {role} node is not healthy: {exc}") from exc
                await asyncio.sleep(0.1)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.settings.gateway.http_host}:{self.http_port}"

    # -- report --------------------------------------------------------------

    def children_changed(self) -> None:
        """Record every child's state; once up, keep endpoints.json's PIDs current.

        A failure to write (a full disk) is reported, and supervision goes on."""
        try:
            write_state(self.home, self.state)
            if self._endpoints_written:
                self.write_endpoints()
        except OSError as exc:
            self.progress.step(f"could not record the children's state: {exc}")

    def _pid(self, name: str) -> int | None:
        status = self.children[name].status
        return status.pid if status.state != ChildState.FAILED else None

    def endpoints(self) -> dict[str, Any]:
        assert self.admin is not None
        host = self.settings.nodes.host
        nodes: dict[str, dict[str, Any]] = {}
        for role in ROLES_WITH_SERVICES:
            nodes[role] = {
                "grpc": f"{host}:{self.ports[role]}",
                "metrics": f"http://{self.settings.nodes.metrics_host}:"
                f"{self.metrics_ports[role]}/metrics",
                "pid": self._pid(role),
                "log": str(self.children[role].spec.log_path),
            }
        nodes["broker"]["enrollment"] = f"{host}:{self.ports['enrollment']}"
        return {
            "home": str(self.home),
            "gateway": {
                "url": self.gateway_url,
                "openai_base_url": self.gateway_url + "/v1",
                "pid": self._pid(GATEWAY),
                "log": str(self.children[GATEWAY].spec.log_path),
            },
            "nodes": nodes,
            "database": {
                "dsn": self.database_url,
                "embedded": self.embedded is not None,
                "pid": self._pid(POSTGRES) if self.embedded is not None else None,
            },
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
        self._endpoints_written = True
        return data

    # -- stop ----------------------------------------------------------------

    def stop_at_once(self) -> None:
        """End every child still running now, without its graceful stop (a second Ctrl-C
        or SIGTERM while :meth:`stop` runs; that stop then only waits for the exits)."""
        running = [child for child in self.children.values() if child.stop_at_once()]
        if running:
            self.progress.step("stopping at once: "
                               + ", ".join(child.name for child in running))

    async def stop(self) -> None:
        if self._endpoints_written:
            with contextlib.suppress(FileNotFoundError):
                self.settings.endpoints_file.resolve().unlink()
            self._endpoints_written = False
        for child in self.children.values():
            await child.unwatch()  # nothing restarts once stopping has begun
        for name in STOP_ORDER:
            if name in self.children:
                await self.children[name].stop()
        self.lifeline.close()


class _FreePorts:
    """Distinct free ports. Each stays bound until all are picked: binding port 0 again
    after closing a socket may return the very same port, and two children were once
    handed one port (the second then failed with "address already in use")."""

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def __enter__(self) -> _FreePorts:
        return self

    def __exit__(self, *_: object) -> None:
        for sock in self._held:
            sock.close()
        self._held = []

    def pick(self, host: str) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._held.append(sock)
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


def _print_summary(data: dict[str, Any], elapsed: float, progress: Progress) -> None:
    say = progress.write
    say(f"\nFederation is up in {elapsed:.1f}s (home {data['home']})")
    say(f"  gateway   {data['gateway']['url']}  "
        f"(OpenAI base URL {data['gateway']['openai_base_url']})")
    for role, node in data["nodes"].items():
        say(f"  {role:<9} grpc {node['grpc']}  metrics {node['metrics']}")
    say(f"  database  {'embedded' if data['database']['embedded'] else 'external'} PostgreSQL")
    say(f"  endpoints written to {Path(data['home']) / 'endpoints.json'}")
    say("A crashed process is restarted; `federation status` shows every one.")
    say("Press Ctrl-C to stop.")


async def run_federation(settings: Settings, *, json_output: bool = False) -> int:
    """Run and supervise until Ctrl-C/SIGTERM; stop everything either way."""
    progress = Progress()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    lock = HomeLock.acquire(home)  # refuses, touching nothing, if a supervisor is alive
    try:
        data_dir = None if settings.database.url else embedded_data_dir(home).resolve()
        await asyncio.to_thread(clean_up_previous, home, data_dir, progress.step)
        return await _run(Federation(settings, progress), progress, json_output)
    finally:
        lock.release()


async def _run(federation: Federation, progress: Progress, json_output: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
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
        federation.watch()
        if json_output:
            Progress(sys.stdout).write(json.dumps(data, indent=2))
        _print_summary(data, progress.elapsed, progress)
        await stop.wait()
        return 0
    finally:
        # A graceful stop may take each node its grace period (longer for one that hangs,
        # or a stalled PostgreSQL): the operator who asks again gets a stop at once.
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, federation.stop_at_once)
        progress.step("stopping the federation (Ctrl-C again to stop at once)")
        await federation.stop()
        progress.step("stopped")
