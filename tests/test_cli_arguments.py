"""Out-of-range and malformed flag values are argparse's one line naming the flag (exit
2), checked before anything is sent: never a traceback from a protobuf field or a date."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from federation.cli.arguments import seconds
from federation.prototime import duration

BAD = [
    ("keys", "issue", "--tenant", "t", "--scope", "chat", "--rpm", "-1"),
    ("keys", "issue", "--tenant", "t", "--scope", "chat", "--rpm", "99999999999"),
    ("keys", "issue", "--tenant", "t", "--scope", "chat", "--token-quota",
     "999999999999999999999999"),
    ("keys", "issue", "--tenant", "t", "--scope", "chat", "--ttl", "99999999999999999999d"),
    ("keys", "rotate", "0123456789abcdef", "--grace", "3000000d"),
    ("keys", "strength", "0123456789abcdef", "--limit", "99999999999"),
    ("audit", "verify", "--from", "99999999999999999999"),
    ("audit", "verify", "--to", "-3"),
    ("edge", "token", "--name", "x", "--ttl", "99999999999d"),
    ("edge", "jobs", "list", "--tenant", "t", "--limit", "99999999999"),
    ("edge", "jobs", "submit", "--tenant", "t", "--kind", "echo", "--priority", "99999999999"),
    ("edge", "jobs", "submit", "--tenant", "t", "--kind", "echo", "--max-attempts", "-1"),
    ("edge", "jobs", "submit", "--tenant", "t", "--kind", "echo", "--deadline", "99999999d"),
    ("edge", "upload", "f", "--cert-dir", "d", "--broker", "b:1", "--chunk-size", "-1"),
    ("pki", "renew", "--within", "nan"),
    ("pki", "renew", "--within", "inf"),
    ("pki", "renew", "--within", "1e300"),
    ("pki", "issue", "--role", "inference", "--name", "n", "--ip", "notanip"),
    ("--log-level", "BOGUS", "status"),
    ("node", "--role", "admin"),  # the operator's role serves nothing
]


@pytest.mark.parametrize("argv", BAD, ids=lambda argv: " ".join(argv[:2] + argv[-2:]))
def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path: Path,
                                                       argv: tuple[str, ...]) -> None:
    run = subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(tmp_path),
                          *argv], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]  # argparse: the usage line, then the error
    flag = next(a for a in reversed(argv) if a.startswith("--"))
    assert f"argument {flag}:" in error, run.stderr
    assert run.stdout == ""


def cli(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(home), *argv],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("argv", "says"), [
    (("keys", "issue", "--tenant", "t", "--scope", "chat", "--quota-period", "1h"),
     "--quota-period is the period of --token-quota"),
    (("audit", "trail", " "), "a request id is needed"),
    (("db", "status", "--url", "nonsense"), "not a PostgreSQL URL"),
    (("db", "migrate", "--database-url", "nonsense"), "--database-url, FEDERATION_DATABASE_URL): "
     "not a PostgreSQL URL"),
])
def test_a_request_that_asks_for_nothing_or_everything_is_refused(
        tmp_path: Path, argv: tuple[str, ...], says: str) -> None:
    run = cli(tmp_path, *argv)  # refused before any connection (none runs here)
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith("federation: error: ") and says in line


def test_enroll_names_a_ca_file_that_is_not_a_certificate(tmp_path: Path) -> None:
    not_pem = tmp_path / "hostname"
    not_pem.write_text("host1\n")
    run = cli(tmp_path, "edge", "enroll", "--broker", "127.0.0.1:9", "--ca", str(not_pem),
              "--token", "fedenroll_x", "--device-name", "phone", "--out",
              str(tmp_path / "creds"))
    assert run.returncode == 1
    assert run.stderr.strip() == (f"federation: error: {not_pem} is not a PEM certificate "
                                  "(the federation's CA, pki/ca.pem on the CA host)")
    assert not (tmp_path / "creds").exists()


def test_json_prints_zero_fields_and_leaves_unset_optionals_out() -> None:
    from federation.cli.support import proto_json
    from federation.v1 import key_authority_pb2 as kpb

    printed = proto_json(kpb.IssueKeyRequest(tenant_id="t"))
    assert printed["description"] == "" and printed["scopes"] == []
    assert "requests_per_minute" not in printed  # optional and unset: no limit


def test_a_bundle_into_a_new_directory_is_written_there(tmp_path: Path) -> None:
    from tests.support import TestPKI

    pki = TestPKI(tmp_path / "home")
    out = tmp_path / "bundles" / "db1.tar.gz"  # as docs/deploy.md writes it
    run = cli(pki.home, "pki", "bundle", "--host", "db1", "--roles", "memory", "--out",
              str(out))
    assert run.returncode == 0, run.stderr
    assert out.is_file() and (out.parent.stat().st_mode & 0o777) == 0o700


def test_addresses_left_by_a_federation_that_exited_are_refused_in_words(
        tmp_path: Path) -> None:
    from tests.support import TestPKI

    pki = TestPKI(tmp_path / "home")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (pki.home / "endpoints.json").write_text(json.dumps({
        "supervisor_pid": int(gone.stdout), "nodes": {"keys": {"grpc": "127.0.0.1:9"}}}))
    run = cli(pki.home, "keys", "list", "--tenant", "t")
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert "is not running (its supervisor, pid" in line and "make run" in line


def test_a_progress_bar_never_drawn_leaves_no_empty_line() -> None:
    import io

    from federation.edge.device.client import ProgressBar

    silent, drawn = io.StringIO(), io.StringIO()
    ProgressBar(silent).close()  # the upload failed before its first chunk
    bar = ProgressBar(drawn)
    bar(10, 10)
    bar.close()
    assert silent.getvalue() == ""
    assert drawn.getvalue().startswith("\r[") and drawn.getvalue().endswith("\n")


def test_a_whole_second_duration_typed_with_a_decimal_stays_whole() -> None:
    """``--quota-period 0.7d`` is 60480 s; as a float it is a hair less, and truncated to
    nanoseconds it was refused by the key authority as not whole seconds (43 of the
    values below were)."""
    units = {"m": 60, "h": 3600, "d": 86400}
    for unit, unit_seconds in units.items():
        for tenths in range(1, 300):
            exact = tenths * unit_seconds  # in tenths of a second
            if exact % 10:
                continue  # not a whole number of seconds as typed
            period = duration(seconds(f"{tenths / 10:g}{unit}"))
            assert (period.seconds, period.nanos) == (exact // 10, 0), f"{tenths / 10:g}{unit}"
