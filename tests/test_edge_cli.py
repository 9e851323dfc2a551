"""End to end through the CLI: a broker daemon, token, enroll, upload, agent, jobs, revoke."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from federation.cli import _overrides, build_parser
from federation.config import load_settings
from federation.db import Database
from tests.support import TestPKI


async def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str],
    *argv: str,
) -> tuple[int, str, str]:
    """A command in this process (no interpreter start-up): parse, resolve, run."""
    for key, value in env.items():
        if key.startswith("FEDERATION_"):
            monkeypatch.setenv(key, value)
    capsys.readouterr()
    args = build_parser().parse_args(argv)
    code = await args.handler(load_settings(_overrides(args)), args)
    out, err = capsys.readouterr()
    return code, out, err


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """A command as its own process, for exit codes, signals and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def start_broker(
    env: dict[str, str], tmp_path: Path
) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    ready = tmp_path / "broker.json"
    log = (tmp_path / "broker.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "node", "--role", "broker",
        "--listen", "127.0.0.1:0", "--ready-file", str(ready), env=env, stdout=log, stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.returncode is None, (tmp_path / "broker.log").read_text()
        assert time.monotonic() < deadline, "broker did not start"
        await asyncio.sleep(0.05)
    return process, json.loads(ready.read_text())


async def test_device_lifecycle_through_the_cli(
    home: Path, database: Database, pg_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    pki = TestPKI(home)
    pki.ca.issue("broker", "local")
    pki.ca.issue("admin", "operator")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {
        "FEDERATION_HOME": str(home),
        "FEDERATION_DATABASE_URL": pg_url,
        "FEDERATION_EDGE_REVOCATION_CACHE_SECONDS": "0",
        "FEDERATION_EDGE_WATCH_POLL_SECONDS": "0.05",
    }
    broker, ports = await start_broker(env, tmp_path)
    agent = None
    try:
        assert ports["enrollment_port"] not in (0, ports["grpc_port"])
        env["FEDERATION_PEERS_BROKER"] = f"127.0.0.1:{ports['grpc_port']}"
        main = f"localhost:{ports['grpc_port']}"

        rc, out, err = await cli(
            monkeypatch, capsys, env, "edge", "token", "--name", "phone", "--ttl", "5m", "--json"
        )
        assert rc == 0, err
        token = json.loads(out)["token"]
        creds = tmp_path / "phone"
        rc, out, err = await cli(
            monkeypatch, capsys, env,
            "edge", "enroll", "--broker", f"localhost:{ports['enrollment_port']}",
            "--ca", str(pki.ca.paths.ca_cert), "--token", token, "--out", str(creds),
        )
        assert rc == 0, err
        assert "spiffe://federation.local/edge/phone" in out

        data = os.urandom(300_000)
        (tmp_path / "photo.jpg").write_bytes(data)
        rc, out, err = await run(
            env, "edge", "upload", str(tmp_path / "photo.jpg"), "--cert-dir", str(creds),
            "--broker", main, "--chunk-size", "65536",
        )
        assert rc == 0, err
        digest = out.strip()
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert "ETA" in err  # the progress bar

        rc, out, err = await cli(
            monkeypatch, capsys, env,
            "edge", "jobs", "submit", "--tenant", "acme", "--kind", "sha256",
            "--blob", digest,
        )
        assert rc == 0, err
        job_id = out.strip()
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", "edge", "agent", "--cert-dir", str(creds),
            "--broker", main, env=env, stderr=asyncio.subprocess.PIPE,
        )
        rc, out, err = await cli(monkeypatch, capsys, env, "edge", "jobs", "watch", job_id)
        assert rc == 0, err
        assert out.splitlines()[-1].startswith("succeeded") and digest in out
        agent.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(agent.wait(), 20) == 0

        rc, out, err = await cli(
            monkeypatch, capsys, env, "edge", "jobs", "list", "--tenant", "acme", "--json"
        )
        assert rc == 0 and [j["state"] for j in json.loads(out)] == ["succeeded"]

        rc, _, err = await cli(monkeypatch, capsys, env, "edge", "revoke", "phone")
        assert rc == 0, err
        rc, _, err = await run(
            env, "edge", "upload", str(tmp_path / "photo.jpg"), "--cert-dir", str(creds),
            "--broker", main,
        )
        assert rc != 0
        assert err.strip().splitlines()[-1] == "federation: error: device phone is revoked"
    finally:
        for process in (agent, broker):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
