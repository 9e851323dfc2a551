"""Out-of-range and malformed flag values are argparse's one line naming the flag (exit
2), checked before anything is sent: never a traceback from a protobuf field or a date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
]


@pytest.mark.parametrize("argv", BAD, ids=lambda argv: " ".join(argv[:2] + argv[-2:]))
def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path: Path,
                                                       argv: tuple[str, ...]) -> None:
    run = subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(tmp_path),
                          *argv], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]  # argparse: the usage line, then the error
    assert f"argument {argv[-2]}:" in error, run.stderr
    assert run.stdout == ""
