"""Flags of the process commands that give settings are checked like the settings: a
port past 65535 is not taken modulo 65536, an address that cannot be bound is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest


def _run(home: Path, *argv: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    return subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(home), *argv],
                          env=clean | (env or {}), capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("argv", [
    ("node", "--role", "inference", "--insecure-dev", "--listen", "127.0.0.1:99999"),
    ("node", "--role", "inference", "--insecure-dev", "--listen", "no-port"),
    ("node", "--role", "inference", "--insecure-dev", "--metrics-port", "70000"),
    ("up", "--http-port", "70000"),
    ("gateway", "--http-port", "-1"),
])
def test_a_port_out_of_range_is_refused_by_its_flag(tmp_path: Path,
                                                    argv: tuple[str, ...]) -> None:
    run = _run(tmp_path, *argv)
    assert run.returncode == 2, run.stderr
    flag = next(a for a in reversed(argv) if a.startswith("--") and a != "--insecure-dev")
    assert f"argument {flag}:" in run.stderr.strip().splitlines()[-1], run.stderr
    assert "Traceback" not in run.stderr


def test_an_address_that_cannot_be_bound_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "federation.toml").write_text(
        "[[inference.models]]\nid = 'm'\nbackend = 'test'\n")
    run = _run(tmp_path, "node", "--role", "inference", "--insecure-dev",
               "--listen", "256.0.0.1:0")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert "federation: error: could not listen on 256.0.0.1:0" in run.stderr


@pytest.mark.parametrize(("url", "says"), [
    ("nonsense", "setting database.url (--database-url, FEDERATION_DATABASE_URL): not a "
                 "PostgreSQL URL"),
    ("postgresql://u@127.0.0.1:abc/db", "the database URL is not usable: invalid literal"),
    ("postgresql://u@127.0.0.1/db?sslmode=bogus", "the database URL is not usable: `sslmode`"),
])
def test_a_malformed_database_url_is_one_line(tmp_path: Path, url: str, says: str) -> None:
    run = _run(tmp_path, "node", "--role", "keys", "--insecure-dev", "--listen", "127.0.0.1:0",
               env={"FEDERATION_DATABASE_URL": url})
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"federation: error: {says}"), (
        run.stderr)


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


@pytest.mark.parametrize("command", [("up", "--http-port", "0"), ("db", "migrate")])
def test_a_database_that_refuses_the_login_is_one_line(tmp_path: Path, pg_admin_url: str,
                                                       command: tuple[str, ...]) -> None:
    # `federation up --database-url` ended in asyncpg's InvalidPasswordError traceback.
    url = _with_password(pg_admin_url, "certainly-not-the-password")
    run = _run(tmp_path, *command, "--database-url", url)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    where = urlsplit(url).netloc.rpartition("@")[2]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"federation: error: cannot connect to PostgreSQL at {where}: password "
        "authentication failed"), run.stderr
    assert "certainly-not-the-password" not in run.stderr


@pytest.mark.parametrize("command", [("up", "--http-port", "0"), ("db", "migrate")])
def test_a_malformed_database_url_for_migrations_is_one_line(tmp_path: Path,
                                                            command: tuple[str, ...]) -> None:
    # `federation up`'s own migrations connected without the pools' checks: a port that is
    # not a number ended in asyncpg's ValueError traceback.
    run = _run(tmp_path, *command, "--database-url", "postgresql://u@127.0.0.1:abc/db")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        "federation: error: the database URL is not usable: invalid literal"), run.stderr
