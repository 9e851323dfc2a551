"""End to end through the CLI: a broker daemon, token, enroll, upload, agent, jobs, revoke."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from federation.cli import _overrides, build_parser
from federation.config import GrpcConfig, load_settings
from federation.db import Database
from federation.edge.device.client import device_channel, upload_status
from federation.errors import FederationError
from federation.v1 import edge_broker_pb2_grpc
from tests.edge_support import (
    FAST_EDGE,
    broker_environment,
    enroll_device,
    node_processes,
    stop_process,
    wait_for,
)
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


async def test_device_lifecycle_through_the_cli(
    home: Path, database: Database, pg_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    pki = TestPKI(home)
    pki.ca.issue("admin", "operator")
    env = broker_environment(home, pg_url)
    async with contextlib.AsyncExitStack() as stack:
        (broker,) = await stack.enter_async_context(node_processes(pki, env, tmp_path, 1))
        assert broker.enrollment_port not in (0, broker.grpc_port)
        env["FEDERATION_PEERS_BROKER"] = f"127.0.0.1:{broker.grpc_port}"
        main = broker.address
        rc, out, err = await cli(
            monkeypatch, capsys, env, "edge", "token", "--name", "phone", "--ttl", "5m", "--json"
        )
        assert rc == 0, err
        token = json.loads(out)["token"]
        creds = tmp_path / "phone"
        rc, out, err = await cli(
            monkeypatch, capsys, env,
            "edge", "enroll", "--broker", f"localhost:{broker.enrollment_port}",
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
            "--broker", main, env=env, stderr=asyncio.subprocess.DEVNULL,
        )
        stack.push_async_callback(stop_process, agent)
        rc, out, err = await cli(monkeypatch, capsys, env, "edge", "jobs", "watch", job_id)
        assert rc == 0, err
        assert out.splitlines()[-1].startswith("succeeded") and digest in out
        rc, out, err = await cli(monkeypatch, capsys, env, "edge", "jobs", "watch", job_id,
                                 "--json")
        assert rc == 0, err
        updates = [json.loads(line) for line in out.splitlines()]  # JSON Lines
        assert updates and updates[-1]["state"] == "succeeded"
        agent.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(agent.wait(), 20) == 0

        rc, out, err = await cli(
            monkeypatch, capsys, env, "edge", "jobs", "list", "--tenant", "acme", "--json"
        )
        assert rc == 0 and [j["state"] for j in json.loads(out)] == ["succeeded"]

        rc, out, err = await cli(monkeypatch, capsys, env, "edge", "revoke", "phnoe", "--json")
        assert rc == 0, err
        assert json.loads(out)["had_enrolled"] is False  # a typo is said, not taken as done
        with pytest.raises(FederationError, match="invalid name"):
            await cli(monkeypatch, capsys, env, "edge", "revoke", "")
        rc, out, err = await cli(monkeypatch, capsys, env, "edge", "revoke", "phone")
        assert rc == 0, err
        assert out.startswith("revoked device phone;")
        rc, _, err = await run(
            env, "edge", "upload", str(tmp_path / "photo.jpg"), "--cert-dir", str(creds),
            "--broker", main,
        )
        assert rc != 0
        assert err.strip().splitlines()[-1] == "federation: error: device phone is revoked"


_PROGRESS = re.compile(r"\] ([0-9.]+) (B|KiB|MiB|GiB)/")
_UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def progress_bytes(stderr: str) -> list[float]:
    """The "done" figures of the upload progress bar, in the order drawn."""
    return [float(value) * _UNIT[unit] for value, unit in _PROGRESS.findall(stderr)]


async def test_killed_upload_resumes_from_the_committed_offset(
    home: Path, database: Database, pg_url: str, tmp_path: Path
) -> None:
    """`federation edge upload` SIGKILLed mid-file; the same command again continues
    from the broker's committed offset (not from 0) and prints the file's digest."""
    pki = TestPKI(home)
    env = broker_environment(
        home, pg_url, dataclasses.replace(FAST_EDGE, upload_commit_bytes=1 << 20)
    )
    data = os.urandom(96 << 20)
    path = tmp_path / "capture.mp4"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    upload_id = f"sha256-{digest}"  # the CLI names the upload after the content
    async with (
        node_processes(pki, env, tmp_path, 1) as (broker,),
        contextlib.AsyncExitStack() as stack,
    ):
        creds = await enroll_device(
            database.pool, pki, broker.enrollment_port, "camera", tmp_path / "camera"
        )
        channel = await stack.enter_async_context(
            device_channel(broker.address, creds, GrpcConfig())
        )
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        argv = ("edge", "upload", str(path), "--cert-dir", str(creds), "--broker",
                broker.address, "--chunk-size", "65536")
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "federation.cli", *argv, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        stack.push_async_callback(stop_process, first)

        async def partly_committed() -> bool:
            status = await upload_status(stub, upload_id)
            return status is not None and status.committed_size > 0

        await wait_for(partly_committed, seconds=30)
        first.kill()
        await first.wait()

        status = await upload_status(stub, upload_id)
        assert status is not None
        assert 0 < status.committed_size < len(data) and not status.complete
        committed = status.committed_size
        rc, out, err = await run(env, *argv)
        assert rc == 0, err
        assert out.strip() == f"sha256:{digest}"
        drawn = progress_bytes(err)
        assert drawn and drawn[-1] == float(len(data))
        # The first chunk it sent was at the committed offset: its progress starts
        # above it (a 64 KiB chunk exceeds the bar's rounding of 0.05 MiB).
        assert drawn[0] > committed, (drawn[0], committed)
        final = await upload_status(stub, upload_id)
        assert final is not None and final.complete
        assert final.blob_digest == f"sha256:{digest}"
    stored = home / "blobs" / "sha256" / digest[:2] / digest
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
