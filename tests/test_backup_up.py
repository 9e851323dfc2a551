"""Backup under load and restore into a fresh home, through real ``federation up`` process
trees and the operator's commands only.

The finding (issue #16): restoring an older dump broke ``federation audit verify`` for good
(records covered by the guardian's checkpoints are missing) and the guardian refused every
new checkpoint. After ``federation restore`` the chain verifies, names exactly the records
lost after the backup point (from the guardian's checkpoints), and new checkpoints are
signed again."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import asyncpg

from tests.up_support import (
    TEST_MODEL,
    TEST_MODEL_TOML,
    ChatClient,
    RunningUp,
    clean_env,
    federation_up,
    until,
)

TOML = TEST_MODEL_TOML + """
[guardian]
checkpoint_every_records = 5
checkpoint_every_seconds = 0.5
"""
"""Frequent checkpoints, so that the guardian signs records written after the backup."""

PASSPHRASE = "a long and honest passphrase"


async def run(env: dict[str, str], *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def newest_checkpoint(home: Path) -> int:
    path = home / "guardian" / "checkpoints.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["sequence"] for line in lines if line.strip()), default=0)


async def chain(up: RunningUp, up_to: int) -> dict[int, bytes]:
    conn = await asyncpg.connect(up.endpoints["database"]["dsn"])
    try:
        rows = await conn.fetch(
            "SELECT sequence, hash FROM memory_records WHERE sequence <= $1", up_to)
    finally:
        await conn.close()
    return {row["sequence"]: bytes(row["hash"]) for row in rows}


async def chat_status(up: RunningUp, key: str) -> int:
    async with aiohttp.ClientSession() as session, session.post(
            up.gateway + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
            json={"model": TEST_MODEL, "max_tokens": 4,
                  "messages": [{"role": "user", "content": "hi"}]}) as response:
        return response.status


async def test_backup_under_load_then_restore_into_a_fresh_home(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    key_file = tmp_path / "offsite" / "federation.keys"

    async with federation_up(source, tmp_path / "source.log", toml=TOML) as up:
        key = await up.issue_key()
        code, out, err = await run(up.env, "vault", "put", "--tenant", "t", "--json",
                                   "db-password", stdin=b"s3cret")
        assert code == 0, err
        secret = json.loads(out)
        code, out, err = await up.cli("edge", "jobs", "submit", "--tenant", "t", "--kind",
                                      "echo", "--payload", "hello", "--json")
        assert code == 0, err
        job_id = json.loads(out)["job_id"]

        load = ChatClient(up.gateway, key)
        chatting = asyncio.create_task(load.run())
        await until(lambda: sum(s == 200 for _, s, _ in load.outcomes) >= 5, 30)
        code, out, err = await up.cli("backup", "--out", str(tmp_path / "backup"), "--json")
        assert code == 0, err
        backup_point = json.loads(out)["audit_sequence"]
        assert json.loads(out)["files"]["database.dump"]["bytes"] > 0

        # Writing goes on after the backup, and the guardian signs some of it.
        later_key = await up.issue_key()
        await until(lambda: newest_checkpoint(source) > backup_point + 5, 30)
        load.stop.set()
        await chatting
        assert all(status == 200 for _, status, _ in load.outcomes), load.outcomes[-3:]
        backed_up = await chain(up, backup_point)
        code, _, err = await up.cli("backup", "--keys", "--out", str(key_file),
                                    "--passphrase-file", str(passphrase))
        assert code == 0, err
    lost_to = newest_checkpoint(source)

    # A fresh home: first the key material, then the data.
    env = clean_env(target)
    target.mkdir()
    (target / "federation.toml").write_text(TOML)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase at all\n")
    code, _, err = await run(env, "restore", "--keys", str(key_file),
                             "--passphrase-file", str(wrong))
    assert code == 1 and err.strip().splitlines() == [
        f"federation: error: {key_file} does not open: wrong passphrase, or the file was "
        "altered"]
    code, _, err = await run(env, "restore", "--keys", str(key_file),
                             "--passphrase-file", str(passphrase))
    assert code == 0, err
    code, out, err = await run(env, "restore", str(tmp_path / "backup"), "--json",
                               "--guardian-checkpoints",
                               str(source / "guardian" / "checkpoints.jsonl"))
    assert code == 0, err
    event = json.loads(out)["restore_event"]
    assert (event["lost_from"], event["lost_to"]) == (backup_point + 1, lost_to)

    async with federation_up(target, tmp_path / "target.log", toml=TOML) as up:
        assert await chain(up, backup_point) == backed_up  # every record up to the backup
        assert await chat_status(up, key) == 200  # the key issued before the backup works
        assert await chat_status(up, later_key) == 401  # the one issued after is not there
        code, out, err = await up.cli("vault", "get", secret["id"], "--share",
                                      secret["client_share"])
        assert code == 0 and out.strip() == "s3cret", err
        code, out, err = await up.cli("edge", "jobs", "list", "--tenant", "t", "--json")
        assert code == 0 and job_id in out, err

        code, out, err = await up.cli("audit", "verify")
        assert code == 0, err
        assert (f"ends at record {backup_point}; records {backup_point + 1}-{lost_to} are lost "
                f"({lost_to - backup_point} records, per the guardian's checkpoint at record "
                f"{lost_to})") in out, out

        # The guardian signs the chain again, above its last checkpoint before the restore.
        await up.issue_key()
        await until(lambda: newest_checkpoint(target) > lost_to + 1, 30)
        code, out, err = await up.cli("audit", "verify", "--json")
        assert code == 0, out + err
        report = json.loads(out)
        assert report["intact"] and int(report["last_checkpoint_sequence"]) > lost_to + 1
        assert [int(r["lost_count"]) for r in report["restores"]] == [lost_to - backup_point]
