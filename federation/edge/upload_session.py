"""One writer's stream on one resumable upload (see :mod:`federation.edge.uploads`).

Chunks arrive at explicit offsets; they are written and hashed (large ones on the
stream's own writer thread, in order), committed (fsynced, then recorded as
``committed_size``) at least every ``upload_commit_bytes`` and every second, and
at the end verified against the declared SHA-256 and handed to the blob store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from federation.config import EdgeConfig
from federation.edge.blobs import BlobStore
from federation.edge.checksum import crc32c
from federation.edge.model import blob_digest
from federation.errors import ErrorCode, FederationError

log = logging.getLogger(__name__)

_COMMIT_EVERY_SECONDS = 1.0
"""Also commit at least this often, so a slow stream's progress becomes resumable."""

_THREAD_OFFLOAD_BYTES = 256 * 1024
"""Chunks this large are written and hashed off the event loop (in parallel with
receiving the next ones); smaller ones cost less than the thread hop."""

_COMMITS_IN_FLIGHT = 2
"""Background commits of one stream at once (see ``UploadSession._start_commit``).
At 1 MiB chunks one at a time had the stream waiting ~15 % of its time for the
previous commit (fsync, then PostgreSQL's own WAL flush for the UPDATE); three
measured no faster than two, and each more lets another 4 MiB wait uncommitted."""

_WRITE_BACKLOG_BYTES = 4 * 1024 * 1024
"""Most bytes of one stream handed to its writer thread and not yet written:
bounds its memory, while receiving runs ahead of the disk instead of waiting
for each chunk (at 1 MiB chunks, one at a time had the stream waiting ~15 % of
its time for the previous chunk's write and hash)."""


class UploadSession:
    """One writer's stream on one upload. Use as ``async with`` (releases the lease)."""

    def __init__(
        self, pool: asyncpg.Pool, blobs: BlobStore, config: EdgeConfig, path: Path,
        owner: str, upload_id: str, row: asyncpg.Record, token: uuid.UUID,
    ) -> None:
        """``path``: the upload's part file (bytes received so far)."""
        self._pool = pool
        self._blobs = blobs
        self._config = config
        self.owner = owner
        self.upload_id = upload_id
        self.total_size: int = row["total_size"]
        self._sha256 = bytes(row["sha256"])
        self.committed: int = row["committed_size"]
        self.written = self.committed
        self.complete: bool = row["complete"]
        self.blob_digest: str = row["blob_digest"]
        self._token = token
        self._path = path
        self._fd: int | None = None
        self._last_commit = time.monotonic()
        self._hasher = hashlib.sha256()
        """SHA-256 of bytes 0..written, kept as chunks arrive: finishing never re-reads."""
        self._commits: collections.deque[asyncio.Task[None]] = collections.deque()
        """Commits running in the background, oldest first."""
        self._target = self.committed
        """The size the newest commit will record."""
        self._writer: ThreadPoolExecutor | None = None
        """One thread per stream: chunks are written and hashed in arrival order."""
        self._writes: collections.deque[tuple[int, int, asyncio.Future[None]]] = (
            collections.deque()
        )
        """(offset, size, future) of chunks handed to the writer, oldest first."""
        self._backlog = 0
        """Bytes in ``_writes``."""
        self._broken = False
        """Set by the writer thread when a write failed: later chunks are skipped."""
        self._failure: BaseException | None = None

    async def open_part(self) -> None:
        """Open the part file to append at ``committed``.

        A part file shorter than ``committed`` (deleted or cut short under the broker)
        no longer holds bytes the broker acknowledged: extending it would fill them
        with zeros, and the upload would fail its SHA-256 only once the client had sent
        everything. Instead the committed size is set back to what the file holds and
        the stream is ABORTED with it, so the client resends from there.
        """
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        held = os.fstat(self._fd).st_size
        if held < self.committed:
            raise await self._lost_bytes(held)
        # Bytes past the committed size were never acknowledged: drop them.
        os.ftruncate(self._fd, self.committed)
        if self.committed:  # resuming: the hash must cover the committed prefix
            await asyncio.to_thread(_hash_prefix, self._path, self.committed, self._hasher)

    async def _lost_bytes(self, held: int) -> FederationError:
        """Record ``held`` as the committed size (below the old one: the exception to
        "never decreases", since the bytes above it are gone) and say so."""
        log.warning("upload part file is shorter than its committed size; resuming from "
                    "what it holds", extra={"upload": self.upload_id, "held": held,
                                            "committed": self.committed})
        await self._pool.execute(
            "UPDATE edge_uploads SET committed_size = $4, updated_at = now() "
            "WHERE owner = $1 AND upload_id = $2 AND writer_token = $3",
            self.owner, self.upload_id, self._token, held,
        )
        lost = self.committed - held
        self.committed = self.written = self._target = held
        return FederationError(
            ErrorCode.ABORTED,
            f"the broker lost the last {lost} committed bytes of upload {self.upload_id!r} "
            f"(its part file is missing or cut short); committed_size={held}: resume from "
            "QueryUploadStatus",
        )

    async def __aenter__(self) -> UploadSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Shielded: a client that hangs up cancels the handler, and the bytes that
        # arrived intact must still be committed and the writer lease released.
        await asyncio.shield(self.close())

    async def write(self, offset: int, data: bytes, checksum: int) -> None:
        """Verify one chunk and take it; its bytes reach the file in the background.

        The CRC32C is checked here, before the chunk is accepted. Writing and
        hashing run in the stream's writer thread (both release the GIL) while
        the next chunks are received, in order, up to ``_WRITE_BACKLOG_BYTES``
        ahead; a commit waits for the writes below it.
        """
        self._check_chunk(offset, data)
        if crc32c(data) != checksum:
            raise FederationError(
                ErrorCode.DATA_LOSS,
                f"chunk at offset {offset} failed its CRC32C check; nothing was written "
                f"(committed_size={self.committed})",
                param="crc32c",
            )
        await self._settle(_WRITE_BACKLOG_BYTES - len(data))
        if self._failure is not None:
            raise self._failure
        if self._writes or len(data) >= _THREAD_OFFLOAD_BYTES:
            self._hand_to_writer(offset, data)
        else:  # nothing queued before it: in order without the thread hop
            self._absorb(offset, data)
        self.written += len(data)
        pending = self.written - self._target
        due = pending >= self._config.upload_commit_bytes
        if due or time.monotonic() - self._last_commit >= _COMMIT_EVERY_SECONDS:
            await self._start_commit()

    def _absorb(self, offset: int, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):  # pwrite may write less than asked
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            raise self._disk_error(exc) from exc
        self._hasher.update(data)

    def _disk_error(self, exc: OSError) -> Exception:
        """A full disk (or quota) is the broker's resource running out, not a bug: the
        device keeps what was committed and resumes once space is freed."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        return FederationError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"the broker's upload store is out of disk space; committed_size="
            f"{self.committed}: resume from there once space is freed",
            retry_after_seconds=60.0)

    def _hand_to_writer(self, offset: int, data: bytes) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="upload-writer")
        future = asyncio.get_running_loop().run_in_executor(
            self._writer, self._absorb_in_order, offset, data
        )
        self._writes.append((offset, len(data), future))
        self._backlog += len(data)

    def _absorb_in_order(self, offset: int, data: bytes) -> None:
        """The writer thread's job: after a failed write, later chunks are neither
        written nor hashed (their futures fail too, so nothing past it commits)."""
        if self._broken:
            raise OSError(f"an earlier write of upload {self.upload_id!r} failed")
        try:
            self._absorb(offset, data)
        except BaseException:
            self._broken = True
            raise

    async def _settle(self, backlog: int) -> None:
        """Wait for the oldest background writes until at most ``backlog`` bytes are
        still queued. If one failed, the bytes from its offset on are not
        ``written``; the failure is kept in ``_failure`` (raised by the next write
        and by finish)."""
        while self._writes and self._backlog > backlog:
            offset, size, future = self._writes[0]
            if not future.done():
                # asyncio.wait, not await: a cancelled handler must not cancel the future
                # of a write still running in its thread (close() waits for it to fsync).
                await asyncio.wait([future])
            if not self._writes or self._writes[0][2] is not future:
                continue  # another waiter settled it meanwhile
            self._writes.popleft()
            self._backlog -= size
            failure = future.exception()
            if failure is not None:
                self.written = min(self.written, offset)
                if self._failure is None:
                    log.error("upload write failed", exc_info=failure,
                              extra={"upload": self.upload_id})
                    self._failure = failure

    def _check_chunk(self, offset: int, data: bytes) -> None:
        if self.complete:
            raise FederationError(ErrorCode.FAILED_PRECONDITION, "the upload is already complete")
        if offset != self.written:
            raise FederationError(
                ErrorCode.FAILED_PRECONDITION,
                f"chunk offset {offset} is not the next offset {self.written}; "
                f"committed_size={self.committed}: resume from QueryUploadStatus",
                param="offset",
            )
        end = offset + len(data)
        if end > self.total_size:
            raise FederationError(
                ErrorCode.OUT_OF_RANGE,
                f"chunk ends at {end}, past the declared size {self.total_size}",
                param="data",
            )
        if len(data) > self._config.chunk_max_bytes:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"chunk of {len(data)} bytes exceeds the maximum {self._config.chunk_max_bytes}",
                param="data",
            )
        if len(data) < self._config.chunk_min_bytes and end != self.total_size:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"chunk of {len(data)} bytes is below the minimum {self._config.chunk_min_bytes}"
                " (only the last chunk may be shorter)",
                param="data",
            )

    async def _start_commit(self) -> None:
        """Commit in the background while the next chunks arrive. Up to
        ``_COMMITS_IN_FLIGHT`` at once: one's fsync overlaps the previous one's
        UPDATE, and a disk slower than the network still holds the stream back."""
        while len(self._commits) >= _COMMITS_IN_FLIGHT:
            await self._commits.popleft()  # re-raises a failed commit (e.g. ABORTED)
        self._last_commit = time.monotonic()
        if self.written > self._target and self._fd is not None:
            self._target = self.written
            last_write = self._writes[-1][2] if self._writes else None
            self._commits.append(asyncio.create_task(self._commit_to(self.written, last_write)))

    async def _wait_commits(self) -> None:
        while self._commits:
            await self._commits.popleft()  # re-raises a failed commit (e.g. ABORTED)

    async def commit(self) -> None:
        """Everything written so far: fsynced, then recorded as committed."""
        await self._wait_commits()
        await self._settle(0)
        self._last_commit = time.monotonic()
        if self.written > self.committed and self._fd is not None:
            self._target = self.written
            await self._commit_to(self.written, None)

    async def _commit_to(self, size: int, after: asyncio.Future[None] | None) -> None:
        """fsync, then record ``size`` as committed (never backwards, whatever order
        concurrent commits finish in).

        ``after`` is the background write of the bytes just below ``size`` (the
        writer thread runs them in order, so the earlier ones are done too): the
        fsync waits for it, and nothing is committed if it, or one before it, failed.
        """
        assert self._fd is not None
        if after is not None:
            if not after.done():
                await asyncio.wait([after])  # not cancelled with us, as in _settle
            if after.cancelled() or after.exception() is not None:
                return  # the failed write is reported by _settle
        try:
            await asyncio.to_thread(_sync_and_drop, self._fd, self.committed, size)
        except OSError as exc:  # a filesystem that reports a full disk at fsync
            raise self._disk_error(exc) from exc
        done = await self._pool.fetchval(
            """
            UPDATE edge_uploads SET committed_size = greatest(committed_size, $4),
                updated_at = now(), writer_expires_at = now() + make_interval(secs => $5)
            WHERE owner = $1 AND upload_id = $2 AND writer_token = $3
            RETURNING committed_size
            """,
            self.owner, self.upload_id, self._token, size,
            self._config.upload_writer_lease_seconds,
        )
        if done is None:
            raise FederationError(ErrorCode.ABORTED,
                                  "this stream lost the upload to another writer")
        self.committed = max(self.committed, size)

    async def finish(self) -> str:
        """Commit, verify the whole content against its SHA-256, store the blob."""
        if self.complete:
            return self.blob_digest
        await self.commit()
        if self._failure is not None:
            raise self._failure
        if self.committed != self.total_size:
            raise FederationError(
                ErrorCode.FAILED_PRECONDITION,
                f"cannot finish: committed_size={self.committed} of {self.total_size} bytes",
            )
        actual = self._hasher.digest()
        if actual != self._sha256:
            await self._forget(self.owner, self.upload_id, self._token)
            self._close_part()
            self._path.unlink(missing_ok=True)
            raise FederationError(
                ErrorCode.DATA_LOSS,
                f"content does not match the declared SHA-256 (got {actual.hex()}); "
                "the upload was discarded: start again",
            )
        self._close_part()
        try:
            await asyncio.to_thread(self._blobs.adopt, self._path, actual.hex())
        except OSError as exc:  # no room for the blob's directory
            raise self._disk_error(exc) from exc
        digest = blob_digest(actual.hex())
        await self._pool.execute(
            """
            UPDATE edge_uploads SET complete = true, blob_digest = $4, writer_token = NULL,
                writer_expires_at = NULL, updated_at = now()
            WHERE owner = $1 AND upload_id = $2 AND writer_token = $3
            """,
            self.owner, self.upload_id, self._token, digest,
        )
        self.complete, self.blob_digest = True, digest
        return digest

    async def close(self) -> None:
        """Commit what arrived intact, then release the writer lease."""
        try:
            if not self.complete:
                await self.commit()
        except FederationError:
            log.info("upload stream closed without committing", extra={"upload": self.upload_id})
        finally:
            # No write or commit may still be using the file when it is closed.
            await asyncio.gather(*self._commits, return_exceptions=True)
            self._commits.clear()
            await self._settle(0)
            self._close_part()
            await self._pool.execute(
                "UPDATE edge_uploads SET writer_token = NULL, writer_expires_at = NULL "
                "WHERE owner = $1 AND upload_id = $2 AND writer_token = $3",
                self.owner, self.upload_id, self._token,
            )

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=False)  # its queue is empty: every write is settled
            self._writer = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    async def _forget(self, owner: str, upload_id: str, token: uuid.UUID) -> None:
        await self._pool.execute(
            "DELETE FROM edge_uploads WHERE owner = $1 AND upload_id = $2 AND writer_token = $3",
            owner, upload_id, token,
        )


def _hash_prefix(path: Path, size: int, hasher: Any) -> None:
    with open(path, "rb") as f:
        while size > 0 and (block := f.read(min(1 << 20, size))):
            hasher.update(block)
            size -= len(block)


def _sync_and_drop(fd: int, start: int, end: int) -> None:
    """fsync, then drop the now clean pages of ``[start, end)`` from the page cache.

    Nothing reads them back (the SHA-256 is computed as chunks arrive), and a
    page cache that keeps growing with upload bytes makes every later write pay
    for reclaim: measured here, buffered writes fell from ~3 GB/s to ~300 MB/s
    once ~1 GB of written pages had accumulated.
    """
    os.fsync(fd)
    if end > start and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
