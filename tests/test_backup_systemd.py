"""``deploy/systemd/``: the nightly backup and the weekly restore test. systemd is not PID 1
here, so the units are checked with ``systemd-analyze verify`` and their ``ExecStart``
command lines are run as written, with their environment file, against a test federation
(a real PostgreSQL holding an audit chain)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

from federation.config import MemoryConfig
from federation.db import Database
from federation.db.roles import pgpass_line
from federation.memory.records import AuditEntry
from federation.memory.store import MemoryStore
from federation.pki import write_private_file
from tests.support import TestPKI

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
INSTALLED_CLI = "/opt/federation/venv/bin/federation"
ENVIRONMENT_FILE = "/etc/federation/backup.env"


def installed_units(into: Path, environment_file: Path) -> list[Path]:
    """The units as installed here: this checkout's ``federation`` and environment file."""
    cli = str(Path(sys.executable).parent / "federation")
    units = []
    for unit in sorted(UNITS.glob("federation-*")):
        text = unit.read_text().replace(INSTALLED_CLI, cli)
        text = text.replace(ENVIRONMENT_FILE, str(environment_file))
        (into / unit.name).write_text(text)
        units.append(into / unit.name)
    return units


def exec_start(unit: Path) -> list[str]:
    lines = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0].removeprefix("ExecStart="))


def environment(path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value
    return env


def test_the_units_run_the_federation_the_nodes_run() -> None:
    """The backup units and the nodes' unit name the same installed ``federation``: a
    deployed host has only the one the playbook installs."""
    node = exec_start(UNITS / "federation@.service")[0]
    assert node == INSTALLED_CLI
    assert {exec_start(unit)[0] for unit in UNITS.glob("federation-*.service")} == {node}


def test_the_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    env_file = tmp_path / "backup.env"
    env_file.write_text("FEDERATION_HOME=/nonexistent\n")
    units = installed_units(tmp_path, env_file)
    assert {u.name for u in units} == {
        "federation-backup.service", "federation-backup.timer",
        "federation-restore-test.service", "federation-restore-test.timer"}
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                            capture_output=True, text=True, timeout=60, check=False)
    # systemd-analyze exits 0 on an unknown directive and only warns: nothing may be said.
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", \
        result.stderr


async def test_the_exec_start_lines_back_up_and_restore_test(
        database: Database, tmp_path: Path) -> None:
    store = MemoryStore(database.pool, MemoryConfig())
    await store.start()
    for number in range(5):
        await store.record(AuditEntry(actor="test", action="key.issue", subject=f"k{number}"))
    await store.stop()
    home = TestPKI(tmp_path / "home").home
    # As backup.env.example has it: no password in the URL, a pgpass file (0600) named by
    # passfile=, as the playbook installs the owner's on the database host.
    dsn = urlsplit(database.url)
    passfile = home / "owner.pgpass"
    write_private_file(passfile, pgpass_line(database.url, unquote(dsn.password or "")).encode())
    url = urlunsplit(dsn._replace(netloc=f"{dsn.username}@{dsn.hostname}:{dsn.port}",
                                  query=f"passfile={passfile}"))
    env_file = tmp_path / "backup.env"
    env_file.write_text(f"FEDERATION_HOME={home}\nFEDERATION_DATABASE_URL={url}\n")
    units = {u.name: u for u in installed_units(tmp_path, env_file)}

    backup = await asyncio.to_thread(
        subprocess.run, exec_start(units["federation-backup.service"]),
        env=environment(env_file), capture_output=True, text=True, timeout=120, check=False)
    assert backup.returncode == 0, backup.stderr
    made = Path(json.loads(backup.stdout)["path"])
    assert made.parent == home / "backups" and made.name.startswith("backup-")

    test = await asyncio.to_thread(
        subprocess.run, exec_start(units["federation-restore-test.service"]),
        env=environment(env_file), capture_output=True, text=True, timeout=120, check=False)
    assert test.returncode == 0, test.stderr
    result = json.loads(test.stdout)
    assert (result["target"], result["records"], result["intact"]) == (
        "scratch database", 5, True)
    assert "restore: audit chain intact: 5 records verified" in test.stderr

    # A damaged newest backup makes the weekly test fail, with one line.
    dump = made / "database.dump"
    dump.write_bytes(dump.read_bytes()[:-10])
    test = await asyncio.to_thread(
        subprocess.run, exec_start(units["federation-restore-test.service"]),
        env=environment(env_file), capture_output=True, text=True, timeout=120, check=False)
    assert test.returncode == 1
    assert test.stderr.strip().splitlines() == [
        f"federation: error: backup refused: database.dump is {dump.stat().st_size} bytes, "
        f"the manifest says {dump.stat().st_size + 10} (truncated or altered)"]
