"""Small helpers for writes that must survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make a file's creation, rename or removal in ``path`` durable (POSIX keeps the
    directory entry in the directory's own data, which ``fsync`` of the file skips)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, path: Path) -> None:
    """``data`` written whole to ``fd``, the file at ``path``. One ``write(2)`` may write
    less than asked and still succeed (a disk filling up, a file size limit): the rest
    is written by the next call, which fails with the reason if it cannot (an OSError
    naming ``path``). ``os.write`` alone, its count unchecked, left a truncated file
    reported as written."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
