"""Resumable uploads and content-addressed blobs (ByteStream/tus semantics).

An upload is named by its owner (the caller's identity) and a client-chosen
id, and declares its total size and SHA-256 up front. Chunks arrive at
explicit offsets that must equal what this stream has written so far; bytes
are written to a part file and, at least every ``upload_commit_bytes`` and at
the end of every stream, fsynced and only then recorded as
``committed_size``, the figure ``QueryUploadStatus`` reports and clients
resume from. ``committed_size`` never decreases, unless the part file lost
bytes under the broker (deleted, cut short): a stream resuming it is ABORTED
and the committed size set to what the file still holds, for the client to
resend the rest (:meth:`UploadSession.open_part`).

One writer at a time: opening a stream takes the upload's writer lease (a row
lock would pin a connection for the whole stream); a second stream on the
same upload is refused with ABORTED, and a writer that lost its lease is
aborted at its next commit. A finished upload is verified against its SHA-256
and moved to ``$FEDERATION_HOME/blobs/sha256/<2 hex>/<64 hex>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from federation.config import EdgeConfig
from federation.db.sessions import session_advisory_lock
from federation.edge.blobs import BlobStore
from federation.edge.upload_session import UploadSession
from federation.errors import ErrorCode, FederationError
from federation.fields import storable

if TYPE_CHECKING:
    from federation.edge.audit import Conn

log = logging.getLogger(__name__)

_STALE = """
NOT complete AND updated_at < now() - make_interval(secs => $1)
AND (writer_token IS NULL OR writer_expires_at <= now())
"""
"""An unfinished upload nobody has written for ``upload_expiry_seconds``."""


@dataclass(frozen=True)
class UploadStatus:
    committed_size: int
    total_size: int
    complete: bool
    blob_digest: str


def _refuse(code: ErrorCode, message: str, param: str | None = None) -> FederationError:
    return FederationError(code, message, param=param)


def _check_upload_id(upload_id: str) -> None:
    """The same rule for starting and for querying: an id no upload can have is a
    malformed request (INVALID_ARGUMENT), not an unknown upload (NOT_FOUND)."""
    storable(upload_id, "upload_id")
    if not upload_id or len(upload_id) > 128:
        raise _refuse(ErrorCode.INVALID_ARGUMENT, "upload_id must be 1-128 characters",
                      "upload_id")


class UploadStore:
    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig, home: Path) -> None:
        self._pool = pool
        self._config = config
        self.blobs = BlobStore(home)
        self._parts = home / "uploads"

    async def status(self, owner: str, upload_id: str) -> UploadStatus:
        _check_upload_id(upload_id)
        row = await self._pool.fetchrow(
            "SELECT * FROM edge_uploads WHERE owner = $1 AND upload_id = $2", owner, upload_id
        )
        if row is None:
            raise _refuse(ErrorCode.NOT_FOUND, f"no upload {upload_id[:128]!r}", "upload_id")
        return UploadStatus(
            row["committed_size"], row["total_size"], row["complete"], row["blob_digest"]
        )

    async def open(
        self, owner: str, upload_id: str, total_size: int, sha256: bytes
    ) -> UploadSession:
        """Open or resume an upload and take its writer lease."""
        self._check_start(upload_id, total_size, sha256)
        token = uuid.uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            # Serialise this owner's starts so the quota sum cannot be raced.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 8))", owner)
            row = await conn.fetchrow(
                "SELECT * FROM edge_uploads WHERE owner = $1 AND upload_id = $2 FOR UPDATE",
                owner,
                upload_id,
            )
            if row is None:
                await self._check_quota(conn, owner, total_size)
                row = await conn.fetchrow(
                    """
                    INSERT INTO edge_uploads (owner, upload_id, total_size, sha256,
                        writer_token, writer_expires_at)
                    VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
                    RETURNING *
                    """,
                    owner, upload_id, total_size, sha256, token,
                    self._config.upload_writer_lease_seconds,
                )
            else:
                row = await self._resume(conn, row, total_size, sha256, token)
        assert row is not None
        session = UploadSession(self._pool, self.blobs, self._config,
                                self.part_path(owner, upload_id), owner, upload_id, row, token)
        if not row["complete"]:
            try:
                await session.open_part()
            except BaseException:
                await session.close()
                raise
        return session

    def _check_start(self, upload_id: str, total_size: int, sha256: bytes) -> None:
        """A malformed start is INVALID_ARGUMENT; one over the device's upload quota is
        INSUFFICIENT_QUOTA (RESOURCE_EXHAUSTED, gRPC's code for a spent per-user quota;
        the error-code trailer tells it from the broker's full disk, RESOURCE_EXHAUSTED
        with a retry-after). No retry-after here: room comes back only when the device's
        unfinished uploads finish or expire."""
        _check_upload_id(upload_id)
        if len(sha256) != 32:
            raise _refuse(ErrorCode.INVALID_ARGUMENT, "sha256 must be 32 bytes", "sha256")
        if total_size > self._config.upload_quota_bytes:
            raise _refuse(
                ErrorCode.INSUFFICIENT_QUOTA,
                f"upload of {total_size} bytes exceeds the per-device quota of "
                f"{self._config.upload_quota_bytes} bytes",
                "total_size",
            )

    async def _check_quota(self, conn: Conn, owner: str, total_size: int) -> None:
        open_bytes = int(
            await conn.fetchval(
                "SELECT coalesce(sum(total_size), 0) FROM edge_uploads "
                "WHERE owner = $1 AND NOT complete",
                owner,
            )
        )
        quota = self._config.upload_quota_bytes
        if open_bytes + total_size > quota:
            raise _refuse(
                ErrorCode.INSUFFICIENT_QUOTA,
                f"upload of {total_size} bytes would exceed the per-device quota: "
                f"{open_bytes} of {quota} bytes are already in unfinished uploads",
                "total_size",
            )

    async def _resume(
        self, conn: Conn, row: asyncpg.Record, total_size: int, sha256: bytes, token: uuid.UUID
    ) -> asyncpg.Record:
        if row["total_size"] != total_size or bytes(row["sha256"]) != sha256:
            raise _refuse(
                ErrorCode.FAILED_PRECONDITION,
                f"upload {row['upload_id']!r} was started with another size or SHA-256",
                "upload_id",
            )
        if row["complete"]:
            return row
        resumed = await conn.fetchrow(
            """
            UPDATE edge_uploads SET writer_token = $3,
                writer_expires_at = now() + make_interval(secs => $4), updated_at = now()
            WHERE owner = $1 AND upload_id = $2
              AND (writer_token IS NULL OR writer_expires_at <= now())
            RETURNING *
            """,
            row["owner"], row["upload_id"], token, self._config.upload_writer_lease_seconds,
        )
        if resumed is None:
            # The other stream may be gone (a broker that crashed cannot release its
            # lease): say when the lease lapses, so a client's retries outlast it.
            wait = self._lease_left(row["writer_expires_at"])
            raise FederationError(
                ErrorCode.ABORTED,
                f"upload {row['upload_id']!r} is being written by another stream "
                f"(committed_size={row['committed_size']}); its writer lease lapses in "
                f"{wait:.1f}s if that stream is gone",
                retry_after_seconds=wait,
            )
        result: asyncpg.Record = resumed
        return result

    async def device_may_read(self, owner: str, device_id: str, digest: str) -> bool:
        """Whether a device may download blob ``digest``: one it uploaded itself
        (``owner``, its identity), or the payload of a job it holds the lease of. A blob
        is content that a tenant or another device gave the broker; knowing its digest
        (from a job listing, a log) is not a right to read it."""
        readable: bool = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM edge_uploads"
            "               WHERE owner = $1 AND complete AND blob_digest = $3)"
            "    OR EXISTS (SELECT 1 FROM edge_jobs"
            "               WHERE leased_by = $2 AND state = 'leased' AND payload_blob = $3)",
            owner, device_id, digest,
        )
        return readable

    async def check_blob_present(self, digest: str) -> None:
        """NOT_FOUND for a blob the broker never stored; DATA_LOSS for one a finished
        upload stored whose file is gone from the blob store (a disk lost or cleaned by
        hand): that is not the caller's mistake, and the operator must restore it."""
        if self.blobs.exists(digest):
            return
        stored = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM edge_uploads WHERE complete AND blob_digest = $1)",
            digest)
        if stored:
            log.error("a stored blob's file is missing", extra={
                "blob_digest": digest, "path": str(self.blobs.path(digest))})
            raise FederationError(
                ErrorCode.DATA_LOSS, f"blob {digest} was stored but its file is gone from "
                "the broker's blob store; restore it from a backup", param="blob_digest")
        raise FederationError(ErrorCode.NOT_FOUND, f"no blob {digest}", param="blob_digest")

    async def expire_stale(self) -> int:
        """Forget unfinished uploads idle for ``upload_expiry_seconds`` (no live writer)
        and delete their part files; returns how many."""
        rows = await self._pool.fetch(
            f"SELECT owner, upload_id FROM edge_uploads WHERE {_STALE} LIMIT 1000",
            self._config.upload_expiry_seconds,
        )
        expired = 0
        for row in rows:
            expired += await self._expire(row["owner"], row["upload_id"])
        if expired:
            log.info("expired abandoned uploads", extra={"uploads": expired})
        return expired

    async def _expire(self, owner: str, upload_id: str) -> int:
        async with self._pool.acquire() as conn:
            key = await conn.fetchval("SELECT hashtextextended($1, 8)", owner)
            # The owner's lock, as open() takes it, but held past the commit until the
            # part file is gone: no stream of this owner can create the file anew between
            # the row's deletion and the file's. The file goes only once the deletion has
            # committed, so a failed commit leaves the row with its file (a crash in
            # between leaves an orphan file, which a new upload of the id truncates).
            async with session_advisory_lock(conn, key, wait=True):
                async with conn.transaction():
                    gone = await conn.fetchval(
                        f"DELETE FROM edge_uploads WHERE owner = $2 AND upload_id = $3 "
                        f"AND {_STALE} RETURNING true",
                        self._config.upload_expiry_seconds, owner, upload_id,
                    )
                if gone:
                    self.part_path(owner, upload_id).unlink(missing_ok=True)
        return 1 if gone else 0

    def _lease_left(self, expires_at: dt.datetime | None) -> float:
        """Seconds until a writer lease lapses (at least a moment, at most one lease)."""
        lease = self._config.upload_writer_lease_seconds
        if expires_at is None:
            return lease
        left = (expires_at - dt.datetime.now(dt.UTC)).total_seconds()
        return min(max(left, 0.1), lease)

    def part_path(self, owner: str, upload_id: str) -> Path:
        name = hashlib.sha256(f"{owner}\0{upload_id}".encode()).hexdigest()
        return self._parts / f"{name}.part"
