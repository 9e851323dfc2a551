"""``deploy/``: the systemd unit template and the Ansible playbook that installs a host.

systemd is not PID 1 here, so units are checked with ``systemd-analyze verify`` and the
installed ``ExecStart`` line is run as written. The playbook runs for real, with a local
connection, into a throwaway root: a venv with the federation installed (its
dependencies reused from this checkout's environment, offline), the host's bundle,
``federation.toml``, the unit and the database drop-in; a second run changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import secure_channel
from federation.config import GrpcConfig, Settings
from federation.denylist import add_denial, read_denials
from federation.pki import CertificateFiles
from federation.pki.bundle import BundleSpec, build_bundle, write_bundle
from tests.nodes_support import free_port
from tests.support import TRUST_DOMAIN, TestPKI

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "deploy" / "ansible" / "bootstrap_node.yml"
TEMPLATE = REPO / "deploy" / "systemd" / "federation@.service"
BIN = Path(sys.executable).parent
INSTALLED_CLI = "/opt/federation/venv/bin/federation"
INSTALLED_HOME = "/var/lib/federation/home"
BACKUP_ENV = REPO / "deploy" / "systemd" / "backup.env.example"
OWNER_PGPASS = "127.0.0.1:5432:federation:federation_owner:owner-secret\n"

needs_ansible = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(),
    reason="ansible-core is not installed (it is in the dev extra: pip install -e '.[dev]')")
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd)")


@dataclass
class Installed:
    root: Path
    ca: TestPKI
    runs: list[str]
    ports: dict[str, int]


def _ansible_env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDERATION_", "ANSIBLE_"))}
    env |= {"ANSIBLE_HOME": str(base / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(base / "ansible-home" / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(base / "ansible-home" / "remote-tmp"),
            "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}:{env.get('PATH', '')}"}
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if not (BIN / "ansible-playbook").exists():
        pytest.skip("ansible-core is not installed (it is in the dev extra)")
    base = tmp_path_factory.mktemp("deploy")
    wheels = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("federation-*.whl"))
    ca = TestPKI(base / "ca-home")
    ca.identity("admin", "operator")
    add_denial(ca.home / "pki" / "denied.json", serial="5f3a", identity="",
               reason="laptop stolen")
    (base / "bundles").mkdir()
    bundle = build_bundle(ca.ca, Settings(home=ca.home),
                          BundleSpec("gpu1", ("inference", "gateway"), ("localhost",),
                                     ("127.0.0.1",)), base / "staging")
    write_bundle(bundle, TRUST_DOMAIN, base / "bundles" / "gpu1.tar.gz")
    credentials = base / "credentials"
    credentials.mkdir()
    (credentials / "gateway.pgpass").write_text("127.0.0.1:5432:federation:u:p\n")
    (credentials / "owner.pgpass").write_text(OWNER_PGPASS)
    # The database host's role too (it runs no node): the backups run there.
    (base / "inventory.yml").write_text(
        "federation:\n  hosts:\n    gpu1:\n      ansible_connection: local\n"
        "      federation_address: 127.0.0.1\n"
        "      federation_roles: [inference, gateway, postgres]\n")
    ports = {role: free_port() for role in
             ("keys", "memory", "guardian", "inference", "council", "broker")}
    variables = {
        "federation_root": str(base / "root"),
        "federation_package": str(wheel),
        "federation_pip_extra_args": "--no-deps",
        "federation_extra_site_packages": sysconfig.get_paths()["purelib"],
        "federation_bundle_dir": str(base / "bundles"),
        "federation_pgpass_dir": str(credentials),
        "federation_deny_list": str(ca.home / "pki" / "denied.json"),
        "federation_trust_domain": TRUST_DOMAIN,
        "federation_database_host": "127.0.0.1",
        "federation_database_name": "federation",
        "federation_models": [{"id": "test-model", "backend": "test"}],
        "federation_ports": ports,
        "federation_metrics_ports": {role: 0 for role in ports},
        "ansible_python_interpreter": sys.executable,
    }
    (base / "vars.json").write_text(json.dumps(variables))
    runs = []
    for _ in range(2):
        run = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(base / "inventory.yml"), str(PLAYBOOK),
             "-e", f"@{base / 'vars.json'}"],
            capture_output=True, text=True, timeout=300, env=_ansible_env(base), check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        runs.append(run.stdout)
    yield Installed(base / "root", ca, runs, ports)


def _recap(output: str) -> dict[str, int]:
    line = next(line for line in output.splitlines() if line.startswith("gpu1 "))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@needs_ansible
def test_the_playbook_installs_a_host_and_a_second_run_changes_nothing(
        installed: Installed) -> None:
    first, second = (_recap(run) for run in installed.runs)
    assert first["changed"] > 0 and first["failed"] == 0
    assert second["changed"] == 0 and second["failed"] == 0, installed.runs[1][-2000:]


@needs_ansible
def test_the_host_holds_its_bundle_config_units_and_credentials(installed: Installed) -> None:
    root = installed.root
    home = root / INSTALLED_HOME.lstrip("/")
    assert sorted(p.name for p in (home / "pki" / "issued").iterdir()) == [
        "gateway-gpu1.key", "gateway-gpu1.pem", "inference-gpu1.key", "inference-gpu1.pem"]
    assert not (home / "pki" / "ca.key").exists() and not (home / "pki" / "nodes-ca.key").exists()
    for private in (home / "pki/issued/inference-gpu1.key",
                    root / "etc/federation/credentials/gateway.pgpass", home / "owner.pgpass",
                    root / "etc/federation/bundle.tar.gz", home / "federation.toml"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    config = (home / "federation.toml").read_text()
    assert f'inference = "127.0.0.1:{installed.ports["inference"]}"' in config
    assert "migrate = false" in config and 'tls = "federation"' in config
    units = root / "etc/systemd/system"
    assert (units / "federation@.service").read_text() == TEMPLATE.read_text()
    drop_in = (units / "federation@gateway.service.d" / "database.conf").read_text()
    assert "passfile=%d/pgpass" in drop_in and "sslmode=verify-full" in drop_in
    assert not (units / "federation@inference.service.d").exists()  # no database role
    assert (root / INSTALLED_CLI.lstrip("/")).exists()
    # The database owner's password, where the backup units' DSN names it (passfile=).
    assert (home / "owner.pgpass").read_text() == OWNER_PGPASS
    # The CA host's deny list reaches every host: the compromise runbook relies on it.
    assert [d.serial for d in read_denials(home / "pki" / "denied.json")] == ["5f3a"]


def _as_installed(text: str, root: Path) -> str:
    """A unit as it reads inside the throwaway root."""
    return (text.replace(INSTALLED_CLI, str(root / INSTALLED_CLI.lstrip("/")))
            .replace(INSTALLED_HOME, str(root / INSTALLED_HOME.lstrip("/"))))


@needs_ansible
@needs_systemd_analyze
def test_the_installed_units_verify(installed: Installed, tmp_path: Path) -> None:
    units = installed.root / "etc/systemd/system"
    (tmp_path / "federation@.service").write_text(
        _as_installed((units / "federation@.service").read_text(), installed.root))
    shutil.copytree(units / "federation@gateway.service.d",
                    tmp_path / "federation@gateway.service.d")
    for instance in ("federation@inference.service", "federation@gateway.service"):
        result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                 str(tmp_path / instance)],
                                capture_output=True, text=True, timeout=60, check=False)
        # systemd-analyze exits 0 on an unknown directive and only warns: nothing may be said.
        assert result.returncode == 0 and result.stderr == "" and result.stdout == "", \
            result.stderr


@needs_systemd_analyze
def test_a_misspelt_hardening_directive_would_be_caught(tmp_path: Path) -> None:
    unit = tmp_path / "federation@.service"
    unit.write_text(TEMPLATE.read_text().replace(INSTALLED_CLI, sys.executable)
                    .replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(tmp_path / "federation@keys.service")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "Failed to parse protect system value" in result.stderr and "strictly" in result.stderr


def _exec_start(unit: str, instance: str) -> list[str]:
    lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return [part.replace("%i", instance) for part in
            shlex.split(lines[0].removeprefix("ExecStart="))]


def _unit_environment(unit: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            name, value = line.removeprefix("Environment=").split("=", 1)
            env[name] = value
    return env


@needs_ansible
def test_the_installed_exec_start_serves_the_role(installed: Installed) -> None:
    """``federation@inference`` as systemd would start it: the installed command, the
    installed home, nothing from this checkout's home; SIGTERM stops it cleanly."""
    unit = _as_installed(
        (installed.root / "etc/systemd/system/federation@.service").read_text(), installed.root)
    process = subprocess.Popen(_exec_start(unit, "inference"), env=_unit_environment(unit),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port = installed.ports["inference"]
        admin = installed.ca.identity("admin", "operator")
        assert _serving(f"127.0.0.1:{port}", admin), _stop(process)
    finally:
        stderr = _stop(process)
    assert process.returncode == 0, stderr


def _serving(target: str, admin: CertificateFiles) -> bool:
    async def check() -> bool:
        async with secure_channel(target, admin, GrpcConfig()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
        return False

    return asyncio.run(check())


def _stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.stderr is not None
    return process.stderr.read().decode(errors="replace")[-3000:]


@needs_ansible
def test_the_playbook_passes_syntax_check_and_ansible_lint(tmp_path: Path) -> None:
    env = _ansible_env(tmp_path)
    syntax = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i",
         str(PLAYBOOK.parent / "inventory" / "example.yml"), str(PLAYBOOK)],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    lint = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--nocolor", str(PLAYBOOK)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                          check=False)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
    assert "0 failure(s), 0 warning(s)" in lint.stdout + lint.stderr


def _task(name_starts: str) -> dict[str, object]:
    (play,) = yaml.safe_load(PLAYBOOK.read_text())
    (task,) = [t for t in play["tasks"] if t["name"].startswith(name_starts)]
    return dict(task)


def test_the_backups_dsn_names_the_owners_pgpass_where_the_playbook_installs_it() -> None:
    """The database host gets the owner's pgpass file, the service user's and 0600, and
    the backup units' example DSN names it instead of holding a password."""
    (play,) = yaml.safe_load(PLAYBOOK.read_text())
    task = _task("Install the database owner's password")
    copy = task["ansible.builtin.copy"]
    assert isinstance(copy, dict)
    assert (copy["src"], copy["mode"]) == ("{{ federation_pgpass_dir }}/owner.pgpass", "0600")
    assert copy["owner"] == copy["group"] == "{{ federation_owner }}"  # the service user
    assert play["vars"]["federation_owner"].startswith("{{ federation_user if ")
    assert task["when"] == "'postgres' in federation_roles"
    installed = copy["dest"].replace("{{ federation_home }}",
                                     play["vars"]["federation_home_installed"])
    lines = [line.lstrip("# ") for line in BACKUP_ENV.read_text().splitlines()]
    (url,) = [line.split("=", 1)[1] for line in lines
              if line.startswith("FEDERATION_DATABASE_URL=")]
    dsn = urlsplit(url)
    assert dsn.password is None and dsn.username == "federation_owner"
    assert parse_qs(dsn.query)["passfile"] == [installed]
    assert parse_qs(dsn.query)["sslmode"] == ["verify-full"]
