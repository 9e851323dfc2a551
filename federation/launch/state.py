"""The supervisor's state file, ``$FEDERATION_HOME/run/supervisor.json``.

``federation up`` rewrites it atomically on every change of a child's state;
the gateway's ``GET /health`` and ``federation status`` read it, and the next
``federation up`` reads a dead supervisor's file to clean up what it left. Each
process is recorded with its start time, so a PID that was since reused by
another process is never mistaken for ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

STATE_FILE = Path("run") / "supervisor.json"

_SAME_PROCESS_SECONDS = 0.5
"""Start times of one process read twice differ by less than this (clock ticks);
a PID reused by another process was started later than that."""


class ChildState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class ChildStatus:
    """One supervised process, as recorded in the state file."""

    name: str
    state: ChildState = ChildState.STARTING
    pid: int | None = None
    create_time: float | None = None
    """Process start time (``psutil``), to recognise this exact process later."""
    restarts: int = 0
    last_exit: str = ""
    """How the last process ended, e.g. ``killed by SIGKILL``; empty if it never did."""
    last_exit_at: float | None = None
    log: str = ""

    def public(self) -> dict[str, Any]:
        """What an unauthenticated caller may see (no PIDs, no paths)."""
        return {"state": str(self.state), "restarts": self.restarts, "last_exit": self.last_exit}


@dataclass
class SupervisorState:
    pid: int
    create_time: float
    children: dict[str, ChildStatus] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return process_matches(self.pid, self.create_time)


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def write_state(home: Path, state: SupervisorState) -> None:
    """Replace the state file atomically (readers never see half a file)."""
    path = state_path(home)
    data = {
        "supervisor": {"pid": state.pid, "create_time": state.create_time},
        "children": {name: asdict(child) for name, child in state.children.items()},
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as stream:
        json.dump(data, stream, indent=2)
    os.replace(tmp, path)


def read_state(home: Path) -> SupervisorState | None:
    """The last state written on ``home``, whether its supervisor is alive or not."""
    try:
        data = json.loads(state_path(home).read_text())
        children = {
            name: ChildStatus(**{**child, "state": ChildState(child["state"])})
            for name, child in data["children"].items()
        }
        supervisor = data["supervisor"]
        return SupervisorState(int(supervisor["pid"]), float(supervisor["create_time"]),
                               children)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # not ours, or from another version: nothing to rely on


def live_state(home: Path) -> SupervisorState | None:
    """The state of the supervisor running on ``home`` now; ``None`` if there is none."""
    state = read_state(home)
    return state if state is not None and state.alive else None


def process_matches(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is alive and is the very process that started at ``create_time``."""
    if not pid or create_time is None:
        return False
    try:
        process = psutil.Process(pid)
        return (abs(process.create_time() - create_time) < _SAME_PROCESS_SECONDS
                and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
