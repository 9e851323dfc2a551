"""`federation up` as a newcomer runs it: everything healthy, everything gone after Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp

from federation.config import ROLES_WITH_SERVICES
from federation.launch.up import _FreePorts
from tests.up_support import clean_env, running_processes, start_up, stop_up
from tests.up_support import delete_embedded_data as delete_data

SUPERVISED = {*ROLES_WITH_SERVICES, "gateway", "postgres"}


async def test_up_serves_every_role_and_stops_cleanly(tmp_path: Path) -> None:
    home = tmp_path / "home"
    up = await start_up(home, tmp_path / "up.log", toml="")  # the defaults, as a newcomer
    try:
        endpoints = up.endpoints
        assert set(endpoints["nodes"]) == set(ROLES_WITH_SERVICES)
        assert endpoints["database"]["embedded"] is True
        assert (os.stat(home / "endpoints.json").st_mode & 0o777) == 0o600

        status, health = await up.health()
        assert status == 200, health
        async with aiohttp.ClientSession() as session:
            for role, node in endpoints["nodes"].items():
                assert await up.serving(role), role
                async with session.get(node["metrics"]) as resp:
                    assert resp.status == 200
                    assert "federation_grpc_server" in await resp.text()
        listed = json.dumps(health)
        for role in ROLES_WITH_SERVICES:
            assert role in listed, f"/health does not list {role}: {health}"
        assert set(health["supervisor"]["children"]) == SUPERVISED
        assert health["components"]["keys"]["supervisor"] == {
            "state": "running", "restarts": 0, "last_exit": ""}

        code, out, err = await up.cli("status")
        assert code == 0, out + err
        assert "all 8 components serving" in out
        code, out, _ = await up.cli("status", "--json")
        report = json.loads(out)
        assert code == 0 and report["healthy"] is True
        assert set(report["components"]) == SUPERVISED
        assert all(c["health"] == "serving" and c["state"] == "running"
                   for c in report["components"].values()), report

        processes = up.processes()
        assert len(processes) > len(SUPERVISED)  # PostgreSQL's own processes too
        assert await stop_up(up) == 0
    finally:
        await stop_up(up)
        delete_data(home)

    assert not (home / "endpoints.json").exists()
    assert running_processes(processes) == [], "processes left running"
    states = {c["state"] for c in json.loads(
        (home / "run" / "supervisor.json").read_text())["children"].values()}
    assert states == {"stopped"}
    output = up.output()
    assert "Traceback" not in output, output


async def test_status_without_a_federation_says_so_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", "status", env=clean_env(home),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    lines = err.decode().splitlines()
    assert lines == [f"federation: error: no federation is running on {home} (start one "
                     "with `make run` or `federation up`, or set FEDERATION_HOME)"]


def test_ports_picked_for_one_start_are_distinct() -> None:
    # Binding port 0 after closing a socket can return the same port again; the ports of
    # one start are held until all are picked, so no two children get the same one.
    with _FreePorts() as free:
        ports = [free.pick("127.0.0.1") for _ in range(300)]
    assert len(set(ports)) == len(ports)
