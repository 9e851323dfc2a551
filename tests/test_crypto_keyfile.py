"""Long-lived key files (``federation.crypto.keyfile``): created 0600 in private
directories, without touching the mode of a directory the federation did not create."""

from __future__ import annotations

import stat
from pathlib import Path

from federation.crypto.keyfile import load_or_create_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_created_in_an_existing_directory_leaves_its_mode_alone(tmp_path: Path) -> None:
    """The key's directory was chmodded 0700 whatever it was: a wrapping key configured
    as an absolute path (``/etc/federation/keys/wrapping.key``) changed the mode of a
    directory the operator made, shared with other readers."""
    shared = tmp_path / "etc-federation"
    shared.mkdir()
    shared.chmod(0o755)
    key = load_or_create_key(shared / "wrapping.key")
    assert len(key) == 32
    assert _mode(shared) == 0o755
    assert _mode(shared / "wrapping.key") == 0o600
    assert load_or_create_key(shared / "wrapping.key") == key


def test_the_directories_a_key_needs_are_created_private(tmp_path: Path) -> None:
    path = tmp_path / "home" / "guardian" / "wrapping.key"
    load_or_create_key(path)
    assert _mode(tmp_path / "home") == 0o700
    assert _mode(tmp_path / "home" / "guardian") == 0o700
    assert _mode(path) == 0o600
