"""Long-lived secret key files: created once, 0600, refused when others can read them."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from federation.durable import write_all


class KeyFileError(RuntimeError):
    pass


def load_or_create_key(
    path: Path, *, size: int = 32, generate: Callable[[], bytes] | None = None
) -> bytes:
    """The key stored at ``path``; created (mode 0600) with fresh random bytes if absent.

    Creation is atomic and exclusive: the key is written to a temporary file and
    hard-linked into place, so two processes starting at once end up with the
    same key instead of one overwriting the other's.
    """
    make = generate or (lambda: secrets.token_bytes(size))
    if not path.exists():
        _make_private_directories(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                write_all(fd, make(), path)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass  # someone else created it first: use theirs
        finally:
            tmp.unlink()  # also when the write failed: no partial key left behind
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    data = path.read_bytes()
    if len(data) != size:
        raise KeyFileError(f"{path} does not hold a {size}-byte key")
    return data


def _make_private_directories(directory: Path) -> None:
    """Create the missing directories up to ``directory``, each 0700. One that exists is
    left as it is: its mode is its owner's choice (``/etc/federation`` shared with other
    readers, say), and it may not even be ours to change."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process starting at the same time
        os.chmod(created, 0o700)  # the umask may have taken bits mkdir's mode asked for
