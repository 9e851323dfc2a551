"""``federation certs``: the deny list stays readable whatever an operator types, and
every certificate of the federation can be shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from federation.config import GrpcConfig
from federation.denylist import add_denial, read_denials
from federation.pki import PKIError
from tests.support import TestPKI


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "federation.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("serial", "identity", "reason"), [
    ("", "", "stolen"),
    ("  ", "", "stolen"),
    ("", " ", "stolen"),
    ("5f3a", "spiffe://federation.local/node/lab/admin", "both at once"),
    ("5f3a", "", ""),
    ("5f3a", "", "   "),
])
def test_a_denial_naming_nothing_or_without_reason_is_refused_before_writing(
        tmp_path: Path, serial: str, identity: str, reason: str) -> None:
    path = tmp_path / "denied.json"
    add_denial(path, serial="ab12", reason="laptop stolen")
    before = path.read_bytes()
    with pytest.raises(PKIError):
        add_denial(path, serial=serial, identity=identity, reason=reason)
    assert path.read_bytes() == before
    assert [d.serial for d in read_denials(path)] == ["ab12"]


def test_the_cli_refuses_a_blank_serial_and_the_list_stays_usable(tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "home")
    denied = cli(pki.home, "certs", "deny", "--serial", "", "--reason", "x")
    assert denied.returncode == 1
    assert denied.stderr.count("\n") == 1 and "Traceback" not in denied.stderr
    assert "serial or one identity" in denied.stderr
    assert not (pki.home / GrpcConfig().deny_list_file).exists()
    ok = cli(pki.home, "certs", "deny", "--serial", "5F:3A", "--reason", "lost", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["serial"] == "5f3a"
    listed = cli(pki.home, "certs", "denied", "--json")
    assert [d["serial"] for d in json.loads(listed.stdout)] == ["5f3a"]
    allowed = cli(pki.home, "certs", "allow", "5f3a", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout) == {"allowed": "5f3a", "entries_removed": 1}


@pytest.mark.parametrize("ca", ["ca.pem", "nodes-ca.pem", "edge-ca.pem"])
def test_show_works_on_the_federations_ca_certificates(tmp_path: Path, ca: str) -> None:
    pki = TestPKI(tmp_path / "home")
    shown = cli(pki.home, "certs", "show", str(pki.home / "pki" / ca), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["identity"] == ""


@pytest.mark.parametrize("ca", ["ca.pem", "nodes-ca.pem", "edge-ca.pem"])
@pytest.mark.parametrize("by", ["--cert", "--serial"])
def test_denying_a_ca_is_refused_rather_than_reported_done(
        tmp_path: Path, ca: str, by: str) -> None:
    """Servers compare the deny list with the serial of the certificate a caller presents,
    never with the CAs above it: `certs deny --cert pki/edge-ca.pem` (the broker's key
    stolen, say) said "denied ... every server on this host refuses it" while every
    device certificate it signed was still accepted."""
    pki = TestPKI(tmp_path / "home")
    path = pki.home / "pki" / ca
    what = str(path) if by == "--cert" else json.loads(
        cli(pki.home, "certs", "show", str(path), "--json").stdout)["serial"]
    denied = cli(pki.home, "certs", "deny", by, what, "--reason", "key stolen")
    assert denied.returncode == 1, denied.stdout
    assert denied.stderr.count("\n") == 1 and "Traceback" not in denied.stderr
    assert "the deny list refuses the certificates callers present" in denied.stderr
    assert "key-or-certificate-compromised.md" in denied.stderr
    assert not (pki.home / GrpcConfig().deny_list_file).exists()
    leaf = cli(pki.home, "certs", "deny", "--cert", str(pki.identity("admin").cert),
               "--reason", "laptop stolen")
    assert leaf.returncode == 0, leaf.stderr  # a leaf is denied as before
