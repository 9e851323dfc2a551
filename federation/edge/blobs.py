"""Finished uploads, stored by content: ``<home>/blobs/sha256/<2 hex>/<64 hex>``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from federation.durable import fsync_directory
from federation.edge.model import parse_blob_digest
from federation.errors import ErrorCode, FederationError


class BlobStore:
    """Finished blobs under ``<home>/blobs/sha256/``."""

    def __init__(self, home: Path) -> None:
        self.root = home / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        hex_digest = parse_blob_digest(digest)
        return self.root / hex_digest[:2] / hex_digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise FederationError(ErrorCode.NOT_FOUND, f"no blob {digest}",
                                  param="blob_digest") from None

    async def read(self, digest: str, offset: int, chunk_size: int) -> AsyncIterator[bytes]:
        """The blob from ``offset`` in chunks; NOT_FOUND / OUT_OF_RANGE up front."""
        size = self.size(digest)
        if offset > size:
            raise FederationError(
                ErrorCode.OUT_OF_RANGE, f"offset {offset} is past the blob's {size} bytes"
            )
        with open(self.path(digest), "rb") as f:
            f.seek(offset)
            while data := await asyncio.to_thread(f.read, chunk_size):
                yield data

    def adopt(self, part: Path, hex_digest: str) -> None:
        """Move a verified part file into place (atomically, durably)."""
        target = self.root / hex_digest[:2] / hex_digest
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # same content uploaded before: keep the existing copy
            part.unlink(missing_ok=True)
            return
        os.replace(part, target)
        fsync_directory(target.parent)
