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
