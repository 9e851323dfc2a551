"""The federation deployed across the namespaces of :mod:`tests.multihost.network`.

As on real hosts: the CA lives on the operator's laptop (the test's own namespace,
``client``); every other host gets only its bundle (installed into a home of its own),
its ``federation.toml`` and, for the roles that use PostgreSQL, its login's pgpass
file; each role runs as ``federation node --role ROLE`` inside its host's namespace.
The database host runs the embedded PostgreSQL on its address, and ``federation db
init-roles`` (from the laptop, over the network) makes the owner and the logins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from federation.config import Settings
from federation.pki import ADMIN_NAME, CertificateAuthority
from federation.pki.bundle import BundleSpec, build_bundle, install_bundle, write_bundle
from tests.multihost.network import SUBNET, Network

TRUST_DOMAIN = "federation.local"
HOSTS = {"db": 10, "gw": 11, "inf1": 12, "inf2": 13, "mem": 14, "cb": 15, "client": 30}
ROLES: dict[str, tuple[str, ...]] = {
    "gw": ("gateway",), "inf1": ("inference",), "inf2": ("inference",),
    "mem": ("memory", "guardian"), "cb": ("council", "broker", "keys"),
}
PORTS = {"keys": 7101, "memory": 7102, "guardian": 7103, "inference": 7104, "council": 7105,
         "broker": 7106}
ENROLLMENT_PORT, GATEWAY_PORT, DB_PORT = 7107, 8443, 5432
DATABASE_ROLES = ("keys", "memory", "guardian", "broker", "gateway")
REQUEST_DEADLINE = 12.0
"""gateway.request_timeout_seconds: how long an in-flight stream may hang, at most."""
FIRST_EVENT_TIMEOUT = 3.0
CLI = str(Path(sys.executable).parent / "federation")
HERE = Path(__file__).resolve().parent


def _peers(network: Network) -> dict[str, str]:
    def where(role: str) -> str:
        return ",".join(f"{network.address(h)}:{PORTS[role]}"
                        for h, roles in ROLES.items() if role in roles)
    return {role: where(role) for role in PORTS}


def config_text(network: Network, host: str) -> str:
    address = network.address(host)
    lines = [f'trust_domain = "{TRUST_DOMAIN}"', f'node_name = "{host}"', "", "[nodes]",
             f'host = "{address}"', f'metrics_host = "{address}"']
    lines += [f"{role}_port = {port}" for role, port in PORTS.items()]
    lines += [f"{role}_metrics_port = {port + 2000}" for role, port in PORTS.items()]
    lines += ["", "[peers]"] + [f'{role} = "{where}"' for role, where in _peers(network).items()]
    lines += ["", "[edge]", f"enrollment_port = {ENROLLMENT_PORT}",
              "", "[grpc]", "reconnect_max_backoff_seconds = 1.0", "call_timeout_seconds = 10",
              "", "[database]", "migrate = false", "command_timeout_seconds = 3",
              "connect_timeout_seconds = 2", "acquire_timeout_seconds = 2",
              "probe_interval_seconds = 0.5", "probe_timeout_seconds = 1",
              "", "[gateway]", f'http_host = "{network.address("gw")}"',
              f"http_port = {GATEWAY_PORT}", 'tls = "federation"',
              f"request_timeout_seconds = {REQUEST_DEADLINE}",
              f"route_first_event_timeout_seconds = {FIRST_EVENT_TIMEOUT}",
              "route_refresh_seconds = 1.0", "health_timeout_seconds = 1.0",
              "auth_cache_ttl_seconds = 1.0",
              "", "[[inference.models]]", 'id = "test-model"', 'backend = "test"',
              "", "[[inference.models]]", 'id = "slow-model"', 'backend = "test"',
              "token_delay_seconds = 0.25",
              "", "[[inference.models]]", 'id = "smollm2-135m-instruct"',
              'backend = "council-scripted"']
    return "\n".join(lines) + "\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


@dataclass
class Running:
    host: str
    role: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class DeployedFederation:
    network: Network
    base: Path
    ca_home: Path = field(init=False)
    processes: list[Running] = field(default_factory=list)
    database: subprocess.Popen[str] | None = None
    owner_url: str = ""

    def __post_init__(self) -> None:
        self.ca_home = self.base / "client" / "home"

    def home(self, host: str) -> Path:
        return self.base / host / "home"

    # -- the operator's side ---------------------------------------------------

    def run(self, host: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.network.command(host, list(argv)), capture_output=True,
                                text=True, timeout=timeout, env=env or clean_env(), check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result

    def cli(self, *args: str, check: bool = True, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
        """``federation`` as the operator, on the laptop (the CA home)."""
        env = clean_env(FEDERATION_HOME=str(self.ca_home),
                        FEDERATION_DATABASE_URL=self.owner_url)
        return self.run("client", [CLI, *args], env=env, check=check, timeout=timeout)

    def client(self, command: str, key: str, *args: str, timeout: float = 120
               ) -> dict[str, Any]:
        base = f"https://{self.network.address('gw')}:{GATEWAY_PORT}"
        result = self.run("client", [sys.executable, str(HERE / "client.py"), command, base,
                                     str(self.ca_home / "pki" / "ca.pem"), key, *args],
                          timeout=timeout)
        return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    def client_in_background(self, command: str, key: str, *args: str) -> subprocess.Popen[str]:
        base = f"https://{self.network.address('gw')}:{GATEWAY_PORT}"
        argv = [sys.executable, str(HERE / "client.py"), command, base,
                str(self.ca_home / "pki" / "ca.pem"), key, *args]
        return subprocess.Popen(self.network.command("client", argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=clean_env())

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        ca = CertificateAuthority.init(self.ca_home, TRUST_DOMAIN)
        ca.issue("admin", ADMIN_NAME)
        (self.ca_home / "federation.toml").write_text(config_text(self.network, "client"))
        self._start_database()
        credentials = self.base / "credentials"
        admin_url = (f"postgresql://postgres:{self._db_password}@{self.network.address('db')}:"
                     f"{DB_PORT}/postgres")
        self.run("client", [CLI, "db", "init-roles", "--admin-url", admin_url, "--out",
                            str(credentials), "--json"])
        self.owner_url = self._url("federation_owner", credentials / "owner.pgpass")
        for host in ROLES:
            self._install(ca, host, credentials)
        for host, roles in ROLES.items():
            for role in roles:
                self._start_role(host, role)
        self.wait_ready()

    def _start_database(self) -> None:
        data = self.base / "db" / "data"
        data.parent.mkdir(parents=True)
        self.database = subprocess.Popen(
            self.network.command("db", [sys.executable, str(HERE / "dbhost.py"), str(data),
                                        self.network.address("db"), f"{SUBNET}.0/24"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env())
        assert self.database.stdout is not None
        line = self.database.stdout.readline()
        if not line:
            raise AssertionError(f"the database host did not start: "
                                 f"{self.database.stderr.read() if self.database.stderr else ''}")
        self._db_password = json.loads(line)["password"]

    def _url(self, user: str, passfile: Path) -> str:
        return (f"postgresql://{user}@{self.network.address('db')}:{DB_PORT}/federation"
                f"?passfile={passfile}")

    def _install(self, ca: CertificateAuthority, host: str, credentials: Path) -> None:
        """What the playbook does on a host: its bundle, its config, its logins' passwords."""
        staging = self.base / "staging" / host
        staging.mkdir(parents=True)
        spec = BundleSpec(host, ROLES[host], (), (self.network.address(host),))
        archive = self.base / "bundles" / f"{host}.tar.gz"
        archive.parent.mkdir(exist_ok=True)
        write_bundle(build_bundle(ca, Settings(home=self.ca_home), spec, staging),
                     TRUST_DOMAIN, archive)
        shutil.rmtree(staging)
        home = self.home(host)
        install_bundle(archive, home, TRUST_DOMAIN)
        (home / "federation.toml").write_text(config_text(self.network, host))
        for role in ROLES[host]:
            if role in DATABASE_ROLES:
                target = home / f"{role}.pgpass"
                shutil.copy(credentials / f"{role}.pgpass", target)
                target.chmod(0o600)

    def _start_role(self, host: str, role: str) -> None:
        home = self.home(host)
        env = clean_env(FEDERATION_HOME=str(home))
        if role in DATABASE_ROLES:
            env["FEDERATION_DATABASE_URL"] = self._url(f"federation_{role}_login",
                                                       home / f"{role}.pgpass")
        log = self.base / "logs" / f"{host}-{role}.log"
        log.parent.mkdir(exist_ok=True)
        ready = home / "run" / f"{role}.ready"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                self.network.command(host, [CLI, "node", "--role", role, "--ready-file",
                                            str(ready)]),
                stdout=stream, stderr=stream, env=env, start_new_session=True)
        self.processes.append(Running(host, role, process, log))

    def wait_ready(self, seconds: float = 90) -> None:
        deadline = time.monotonic() + seconds
        for running in self.processes:
            ready = self.home(running.host) / "run" / f"{running.role}.ready"
            while not ready.exists():
                if running.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{running.role} on {running.host} did not start:\n"
                                         + self.log_tail(running))
                time.sleep(0.1)

    def log_tail(self, running: Running, lines: int = 30) -> str:
        return "\n".join(running.log.read_text(errors="replace").splitlines()[-lines:])

    def running(self, host: str, role: str) -> Running:
        return next(r for r in self.processes if (r.host, r.role) == (host, role))

    # -- stop ------------------------------------------------------------------

    def stop(self, report: TextIO | None = None) -> None:
        for running in self.processes:
            if running.process.poll() is None:
                os.killpg(running.process.pid, signal.SIGTERM)
        for running in self.processes:
            try:
                running.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(running.process.pid, signal.SIGKILL)
                running.process.wait()
        if self.database is not None and self.database.poll() is None:
            assert self.database.stdin is not None
            self.database.stdin.close()
            try:
                self.database.wait(30)
            except subprocess.TimeoutExpired:
                self.database.kill()
                self.database.wait()
