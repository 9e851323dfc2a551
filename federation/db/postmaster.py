"""A PostgreSQL server seen from outside: what its ``postmaster.pid`` says, whether
that server still runs, and how a process ended (for people)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

_POSTMASTER_PID_LINES = 8  # pid, data dir, start time, port, socket dir, host, shmem, status


@dataclass(frozen=True)
class PostmasterPid:
    """What ``postmaster.pid`` says about the server that wrote it."""

    pid: int
    start_time: float
    port: int
    status: str

    @classmethod
    def read(cls, data_dir: Path) -> PostmasterPid | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return cls(int(lines[0]), float(lines[2]), int(lines[3] or 0),
                       lines[7].strip() if len(lines) >= _POSTMASTER_PID_LINES else "")
        except (IndexError, ValueError):
            return None  # being written, or truncated by a crash


def postmaster_alive(info: PostmasterPid) -> bool:
    """Whether the server ``info`` describes still runs (PID and start time both match)."""
    import psutil

    try:
        created = psutil.Process(info.pid).create_time()
    except psutil.Error:
        return False
    return abs(created - info.start_time) < 2.0


def describe_exit(returncode: int | None) -> str:
    """``exit status 1``, ``killed by SIGKILL``: how a process ended, for people."""
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
