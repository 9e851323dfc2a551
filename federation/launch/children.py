"""The processes ``federation up`` supervises: each node, the gateway and the
embedded PostgreSQL, as :class:`~federation.launch.supervisor.ChildSpec` s (how to
spawn one, wait until it is ready, stop it); and how a process is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

import aiohttp

from federation.config import Settings
from federation.db.embedded import EmbeddedPostgres
from federation.errors import CommandError
from federation.launch.lifeline import Lifeline
from federation.launch.supervisor import process_exit

GATEWAY = "gateway"
POSTGRES = "postgres"
_STOP_ORDER_TIMEOUT = 5.0


class Progress:
    """Human progress lines on stderr: what is being done, what is done, how long it took.

    Best effort: the supervisor reports through it, so a write that fails (the terminal
    closed, ``federation up 2>&1 | head`` whose reader left: EPIPE) must not end the
    supervision that called it. The lines are lost from then on; ``run/supervisor.json``
    and ``federation status`` still say everything."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._started = time.monotonic()
        self._lost = False

    def step(self, message: str) -> None:
        elapsed = time.monotonic() - self._started
        self.write(f"[{elapsed:5.1f}s] {message}")

    def write(self, text: str) -> None:
        """``text`` and a newline, if the stream still takes them."""
        if self._lost:
            return
        try:
            print(text, file=self._stream, flush=True)
        except (OSError, ValueError):  # ValueError: the stream was closed
            self._lost = True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started


class Launcher(Protocol):
    """What a child needs from the supervisor that starts it (``up.Federation``)."""

    home: Path
    settings: Settings
    env: dict[str, str]
    """The children's environment."""
    lifeline: Lifeline
    progress: Progress

    @property
    def gateway_url(self) -> str: ...

    async def wait_serving(self, role: str, port: int, deadline: float) -> None:
        """Until the node on ``port`` answers gRPC health SERVING; CommandError at
        ``deadline``."""


class _PythonChild:
    """A ``federation node`` or ``federation gateway`` process (see ``ChildSpec``)."""

    stop_now_signal = signal.SIGKILL

    def __init__(self, federation: Launcher, name: str, argv: list[str]) -> None:
        self.federation = federation
        self.name = name
        self.log_path = federation.home / "logs" / f"{name}.log"
        self.ready_file = federation.home / "run" / f"{name}.json"
        self.argv = [*argv, "--ready-file", str(self.ready_file),
                     "--lifeline-fd", str(federation.lifeline.child_fd)]
        self.info: dict[str, Any] = {}
        self.ready_once = False

    def spawn(self) -> subprocess.Popen[bytes]:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self.federation.env,
                # Own session: Ctrl-C reaches only the supervisor, which then stops the
                # children in order. The lifeline stops them if the supervisor dies.
                start_new_session=True,
                pass_fds=(self.federation.lifeline.child_fd,),
            )

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        await terminate(process, self.federation.settings.grpc.grace_seconds
                        + _STOP_ORDER_TIMEOUT)

    async def _wait_ready_file(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return
            if process.poll() is not None:
                raise CommandError(
                    f"the {self.name} process exited during start-up "
                    f"(log {self.log_path}):\n{log_tail(self.log_path)}")
            await asyncio.sleep(0.05)
        raise CommandError(f"the {self.name} process did not start in time "
                           f"(log {self.log_path})")

    def _deadline(self) -> float:
        return time.monotonic() + self.federation.settings.nodes.startup_timeout_seconds


class NodeChild(_PythonChild):
    async def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = self._deadline()
        await self._wait_ready_file(process, deadline)
        await self.federation.wait_serving(self.name, int(self.info["grpc_port"]), deadline)

    def on_ready(self, process: subprocess.Popen[bytes]) -> None:
        if not self.ready_once:
            self.federation.progress.step(
                f"{self.name:<9} serving on {self.federation.settings.nodes.host}:"
                f"{self.info['grpc_port']} (metrics :{self.info['metrics_port']}, "
                f"pid {process.pid})")
        self.ready_once = True


class GatewayChild(_PythonChild):
    async def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """The first start waits for ``/health`` 200 (everything reachable); a restart
        only for an answer, since a node may be restarting or failed meanwhile."""
        deadline = self._deadline()
        await self._wait_ready_file(process, deadline)
        url = f"{self.federation.gateway_url}/health"
        last = ""
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        last = f"HTTP {resp.status}: {await resp.text()}"
                        if resp.status == 200 or self.ready_once:
                            return
                except aiohttp.ClientError as exc:
                    last = str(exc)
                await asyncio.sleep(0.2)
        raise CommandError(f"the gateway did not become healthy ({last}); log "
                           f"{self.log_path}:\n{log_tail(self.log_path)}")

    def on_ready(self, process: subprocess.Popen[bytes]) -> None:
        if not self.ready_once:
            self.federation.progress.step(
                f"{GATEWAY:<9} serving on {self.federation.gateway_url} (pid {process.pid})")
        self.ready_once = True


class PostgresChild:
    """The embedded postmaster, in the foreground (see ``federation.db.embedded``)."""

    name = POSTGRES
    stop_now_signal = signal.SIGQUIT
    """PostgreSQL's immediate shutdown: no checkpoint, WAL replayed at the next start,
    nothing committed lost."""

    def __init__(self, federation: Launcher, server: EmbeddedPostgres) -> None:
        self.federation = federation
        self.server = server
        self.log_path = server.log_file
        self.ready_once = False

    def spawn(self) -> subprocess.Popen[bytes]:
        return self.server.spawn()

    async def wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        timeout = self.federation.settings.nodes.startup_timeout_seconds
        deadline = time.monotonic() + timeout
        while not self.server.ready(process):
            if time.monotonic() >= deadline:
                raise self.server.not_ready_error(timeout)
            await asyncio.sleep(0.05)

    async def stop(self, process: subprocess.Popen[bytes]) -> None:
        await asyncio.to_thread(self.server.shutdown, process)
        self.federation.progress.step("PostgreSQL: embedded server stopped")

    def on_ready(self, process: subprocess.Popen[bytes]) -> None:
        if not self.ready_once:
            data = f"data {self.server.data_dir}"
            if self.server.requested_dir.is_symlink():
                data += f", linked from {self.server.requested_dir}"
            self.federation.progress.step(
                f"PostgreSQL: embedded server on {self.server.host}:{self.server.port} "
                f"(pid {process.pid}, {data})")
        self.ready_once = True


async def terminate(process: asyncio.subprocess.Process | subprocess.Popen[bytes],
                    grace: float) -> None:
    """SIGTERM (a node's graceful stop), then SIGKILL if it has not exited in ``grace``."""
    if process.returncode is not None or _exited(process):
        return
    with contextlib.suppress(ProcessLookupError):  # exited since the check
        process.send_signal(signal.SIGTERM)
    if not await _exits_within(process, grace):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await _exits_within(process, None)


def _exited(process: asyncio.subprocess.Process | subprocess.Popen[bytes]) -> bool:
    return isinstance(process, subprocess.Popen) and process.poll() is not None


async def _exits_within(process: asyncio.subprocess.Process | subprocess.Popen[bytes],
                        seconds: float | None) -> bool:
    if isinstance(process, subprocess.Popen):
        return await process_exit(process, seconds) is not None
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])
