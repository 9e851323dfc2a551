"""A small filesystem a test can fill: a tmpfs mounted for the test and removed after
it, so a "full disk" never touches the machine's real disks. Needs root (mount);
elsewhere the test is skipped with one reason."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BALLAST = ".ballast"


@contextlib.contextmanager
def small_filesystem(size_mib: int, path: Path | None = None) -> Iterator[Path]:
    """A fresh tmpfs of ``size_mib`` MiB (mode 0755) at ``path``, or at a new directory
    under /tmp that every user may traverse (the embedded PostgreSQL's system user must
    reach a home kept there); unmounted and removed at exit."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("simulating a full disk needs root to mount a small tmpfs")
    mount_point = path or Path("/tmp") / f"federation-small-fs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "federation-test",
         str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        if path is None:
            with contextlib.suppress(OSError):
                mount_point.rmdir()


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave_bytes: int = 0) -> None:
    """Grow the ballast file in ``path`` until ``leave_bytes`` are left (0: until the
    filesystem refuses another byte)."""
    fd = os.open(path / BALLAST, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        want = size + max(0, free_bytes(path) - leave_bytes)
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, want)
        if leave_bytes == 0:
            step = 64 * 1024
            while step >= 4096:
                try:
                    os.posix_fallocate(fd, 0, os.fstat(fd).st_size + step)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    step //= 2
    finally:
        os.close(fd)


def free_space(path: Path) -> None:
    """Remove the ballast: the operator's fix."""
    (path / BALLAST).unlink(missing_ok=True)
