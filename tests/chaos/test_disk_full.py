"""Runbook drill: disk full (docs/runbooks/disk-full.md), on small tmpfs filesystems
made for the test (tests/disk_support.py), never the machine's disks.

* The upload store: a device's upload into a full broker home is refused with
  RESOURCE_EXHAUSTED naming the full disk and the committed size; nothing committed
  is lost; once space is freed the same upload resumes and its blob is exact.
* The database: ``federation up`` with its home (embedded PostgreSQL included) on a
  small filesystem. Nearly full, the free-space series is below the alert's threshold
  while requests still succeed; full, chat answers 503 whose message says the disk is
  full (never 500, never an unaudited answer); freed, everything serves again and the
  audit chain verifies.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from federation.db import Database
from federation.edge.device.client import describe_file, upload_file, upload_status
from federation.errors import ErrorCode, FederationError
from tests.disk_support import fill, free_space, small_filesystem
from tests.edge_support import FAST_EDGE, broker_server, device_stub
from tests.support import TestPKI
from tests.up_support import TEST_MODEL, federation_up, until

MIB = 1024 * 1024
CHUNK = 256 * 1024


async def test_a_full_upload_store_refuses_with_resource_exhausted_then_resumes(
        tmp_path: Path, database: Database) -> None:
    with small_filesystem(16, tmp_path / "home") as home:
        pki = TestPKI(home)
        data = os.urandom(6 * MIB)
        path = tmp_path / "capture.bin"
        path.write_bytes(data)
        info = describe_file(path)
        async with broker_server(pki, database, home, FAST_EDGE) as (server, _, _):
            stub = device_stub(pki, server.port, "cam")
            fill(home, leave_bytes=2 * MIB)
            with pytest.raises(FederationError) as refused:
                await upload_file(stub, path, chunk_size=CHUNK, info=info)
            assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
            assert "out of disk space" in refused.value.message
            committed = int(re.findall(r"committed_size=(\d+)", refused.value.message)[0])
            status = await upload_status(stub, info.upload_id)
            assert status is not None and not status.complete
            assert 0 < status.committed_size <= 2 * MIB
            assert committed <= status.committed_size

            free_space(home)
            digest = await upload_file(stub, path, chunk_size=CHUNK, info=info)
            stored = home / "blobs" / "sha256" / digest[7:9] / digest[7:]
            assert stored.read_bytes() == data


async def _chat(session: aiohttp.ClientSession, gateway: str, key: str) -> tuple[int, str]:
    async with session.post(gateway + "/v1/chat/completions",
                            headers={"Authorization": f"Bearer {key}"},
                            json={"model": TEST_MODEL, "max_tokens": 4,
                                  "messages": [{"role": "user", "content": "hello"}]},
                            timeout=aiohttp.ClientTimeout(total=30)) as response:
        body = await response.text()
        return response.status, response.headers.get("x-request-id", "") \
            if response.status == 200 else body


async def _volume_ratio(metrics_url: str, volume: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
        text = await response.text()
    values = {}
    for name in ("federation_disk_free_bytes", "federation_disk_size_bytes"):
        match = re.search(rf'^{name}{{[^}}]*volume="{volume}"[^}}]*}} (\S+)$', text, re.M)
        assert match is not None, (name, volume)
        values[name] = float(match.group(1))
    return values["federation_disk_free_bytes"] / values["federation_disk_size_bytes"]


async def test_a_full_database_disk_fails_audit_closed_then_recovers(tmp_path: Path) -> None:
    with small_filesystem(192) as home:
        async with federation_up(home, tmp_path / "up.log") as up:
            key = await up.issue_key()
            memory_metrics = up.endpoints["nodes"]["memory"]["metrics"]
            # A fresh WAL segment: what follows fits in space already allocated, as on a
            # server whose WAL is on a disk of its own (the usual advice).
            conn = await asyncpg.connect(up.endpoints["database"]["dsn"])
            try:
                await conn.execute("SELECT pg_switch_wal(); CHECKPOINT")
            finally:
                await conn.close()

            fill(home, leave_bytes=int(0.04 * os.statvfs(home).f_blocks
                                       * os.statvfs(home).f_frsize))
            assert 0 < await _volume_ratio(memory_metrics, "database") < 0.05  # alerts fire
            answers: list[tuple[int, str]] = []
            async with aiohttp.ClientSession() as session:
                answers.append(await _chat(session, up.gateway, key))
                assert answers[-1][0] == 200, answers  # before it happens

                fill(home)
                for _ in range(2000):
                    answers.append(await _chat(session, up.gateway, key))
                    if answers[-1][0] != 200:
                        break
                refused = answers[-1]
                assert refused[0] == 503, refused
                assert "out of disk space" in refused[1], refused
                for _ in range(5):  # and it stays refused, with no 500 among them
                    status, body = await _chat(session, up.gateway, key)
                    assert (status, "out of disk space" in body) == (503, True), body

                free_space(home)
                recovered = await _until_ok(session, up.gateway, key, answers)
            audited = await up.audited_answers()
            answered = [detail for status, detail in answers if status == 200]
            assert [r for r in answered if audited[r] != 1] == []
            code, out, err = await up.cli("audit", "verify")
            assert code == 0 and "intact" in out, out + err
            assert up.child("postgres")["restarts"] == 0  # no PANIC: a refused write only
    print(f"\n{len(answered)} answered, refused with {refused[1][:160]}; "
          f"serving again {recovered:.1f}s after the space was freed")


async def _until_ok(session: aiohttp.ClientSession, gateway: str, key: str,
                    answers: list[tuple[int, str]]) -> float:
    ok = False

    async def poll() -> None:
        nonlocal ok
        while not ok:
            answers.append(await _chat(session, gateway, key))
            ok = answers[-1][0] == 200
            await asyncio.sleep(0.2)

    task = asyncio.ensure_future(poll())
    try:
        return await until(lambda: ok, 60)
    finally:
        task.cancel()
