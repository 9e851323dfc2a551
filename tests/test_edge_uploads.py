"""Resumable uploads and downloads through the real broker over mTLS."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from federation.db import Database
from federation.edge.checksum import crc32c, crc32c_python
from federation.edge.device.client import (
    Stub,
    describe_file,
    download_blob,
    upload_file,
    upload_status,
)
from federation.edge.uploads import UploadStore
from federation.errors import RETRY_AFTER_METADATA, ErrorCode, FederationError, from_rpc_error
from federation.pki import Identity
from federation.v1 import edge_broker_pb2 as pb
from tests.edge_support import FAST_EDGE, admin_stub, broker_server, device_stub, register
from tests.support import TestPKI

KIB = 1024
CONFIG = dataclasses.replace(
    FAST_EDGE, upload_commit_bytes=64 * KIB, upload_quota_bytes=8 * 1024 * KIB
)
CHUNK = 256 * KIB


def chunk(offset: int, data: bytes, *, corrupt: bool = False) -> pb.UploadRequest:
    checksum = crc32c(data) ^ (1 if corrupt else 0)
    return pb.UploadRequest(chunk=pb.UploadChunk(offset=offset, data=data, crc32c=checksum))


def start(upload_id: str, data: bytes, total: int | None = None) -> pb.UploadRequest:
    return pb.UploadRequest(
        start=pb.UploadStart(
            upload_id=upload_id,
            total_size=len(data) if total is None else total,
            sha256=hashlib.sha256(data).digest(),
        )
    )


async def feed(queue: asyncio.Queue[pb.UploadRequest | None]) -> AsyncIterator[pb.UploadRequest]:
    while (item := await queue.get()) is not None:
        yield item


async def until_committed(stub: object, upload_id: str, size: int) -> None:
    for _ in range(200):
        status = await upload_status(stub, upload_id)  # type: ignore[arg-type]
        if status is not None and status.committed_size >= size:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"upload {upload_id} never committed {size} bytes")


async def first_chunk_committed(stub: Stub, upload_id: str, data: bytes
                                ) -> tuple[asyncio.Queue[pb.UploadRequest | None],
                                           grpc.aio.StreamUnaryCall[pb.UploadRequest,
                                                                    pb.UploadResponse]]:
    """An Upload of ``data`` whose first chunk is committed; the rest of the stream is
    what the caller puts on the queue (``None`` ends it). Returns the queue and the call."""
    queue: asyncio.Queue[pb.UploadRequest | None] = asyncio.Queue()
    call = stub.Upload(feed(queue))
    queue.put_nowait(start(upload_id, data))
    queue.put_nowait(chunk(0, data[:CHUNK]))
    await until_committed(stub, upload_id, CHUNK)
    return queue, call


def assert_over_quota(refused: grpc.aio.AioRpcError) -> None:
    """gRPC's code for a spent per-user quota, and the catalog's code that tells it
    from a full disk; no retry-after (waiting alone frees nothing)."""
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(refused)
    assert (error.code, error.retry_after_seconds) == (ErrorCode.INSUFFICIENT_QUOTA, None)


def test_crc32c_matches_reference_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283 == crc32c_python(b"123456789")


async def test_cut_at_half_then_resume(home: Path, database: Database, tmp_path: Path) -> None:
    pki = TestPKI(home)
    data = os.urandom(12 * CHUNK + 1234)
    path = tmp_path / "capture.bin"
    path.write_bytes(data)
    info = describe_file(path)
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        stub = device_stub(pki, server.port, "cam")
        queue: asyncio.Queue[pb.UploadRequest | None] = asyncio.Queue()
        call = stub.Upload(feed(queue))
        queue.put_nowait(start(info.upload_id, data))
        half = 6 * CHUNK
        for offset in range(0, half, CHUNK):
            queue.put_nowait(chunk(offset, data[offset : offset + CHUNK]))
        await until_committed(stub, info.upload_id, half)
        call.cancel()  # the connection drops mid-upload
        status = await upload_status(stub, info.upload_id)
        assert status is not None and status.committed_size == half and not status.complete
        digest = await upload_file(stub, path, chunk_size=CHUNK, info=info)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        final = await upload_status(stub, info.upload_id)
        assert final is not None and final.complete and final.committed_size == len(data)
        stored = home / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert stored.read_bytes() == data
        assert await download_blob(stub, digest, offset=len(data) - 5000) == data[-5000:]
        # Running the upload again finds it complete and returns the same digest.
        assert await upload_file(stub, path, chunk_size=CHUNK, info=info) == digest


@pytest.mark.parametrize("kept", [None, 0, 2 * CHUNK + 1000])
async def test_a_lost_part_file_is_resent_not_zero_filled(
    home: Path, database: Database, tmp_path: Path, kept: int | None
) -> None:
    """The part file is deleted (``None``) or cut to ``kept`` bytes while the upload is
    stopped. On resume the broker does not claim the bytes it lost: the stream is
    ABORTED with the size it really holds, which QueryUploadStatus reports from then on,
    and the real client resends from there and finishes with the right content."""
    pki = TestPKI(home)
    data = os.urandom(12 * CHUNK + 1234)
    path = tmp_path / "capture.bin"
    path.write_bytes(data)
    info = describe_file(path)
    async with broker_server(pki, database, home, CONFIG) as (server, broker, _):
        stub = device_stub(pki, server.port, "cam")
        half = 6 * CHUNK
        reply = await stub.Upload(iter([start(info.upload_id, data)] + [
            chunk(offset, data[offset : offset + CHUNK]) for offset in range(0, half, CHUNK)
        ]))  # the stream ends without finish: the phone stopped midway
        assert reply.committed_size == half
        owner = Identity(pki.ca.trust_domain, "cam", "edge").spiffe_id
        part = broker.uploads.part_path(owner, info.upload_id)
        if kept is None:
            part.unlink()
        else:
            os.truncate(part, kept)
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await stub.Upload(iter([start(info.upload_id, data),
                                    chunk(half, data[half : half + CHUNK])]))
        assert lost.value.code() is grpc.StatusCode.ABORTED
        assert f"committed_size={kept or 0}" in (lost.value.details() or "")
        status = await upload_status(stub, info.upload_id)
        assert status is not None and status.committed_size == (kept or 0)
        if kept:  # once more, and this time the client meets the loss itself
            os.truncate(part, kept // 2)
        digest = await upload_file(stub, path, chunk_size=CHUNK, info=info)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        stored = home / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert stored.read_bytes() == data


async def test_corrupt_chunk_wrong_offset_and_oversize_refused(
    home: Path, database: Database
) -> None:
    pki = TestPKI(home)
    data = os.urandom(3 * CHUNK)
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        stub = device_stub(pki, server.port, "cam")

        async def send(*messages: pb.UploadRequest) -> grpc.aio.AioRpcError:
            async def gen() -> AsyncIterator[pb.UploadRequest]:
                for m in messages:
                    yield m

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Upload(gen())
            return refused.value

        corrupt = await send(
            start("u1", data), chunk(0, data[:CHUNK]), chunk(CHUNK, data[CHUNK:], corrupt=True)
        )
        assert corrupt.code() is grpc.StatusCode.DATA_LOSS
        status = await upload_status(stub, "u1")
        assert status is not None and status.committed_size == CHUNK  # did not move

        wrong = await send(start("u1", data), chunk(2 * CHUNK, data[2 * CHUNK :]))
        assert wrong.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert f"committed_size={CHUNK}" in (wrong.details() or "")

        small = data[: 100 * KIB]
        over = await send(
            start("u2", small), chunk(0, data[: 64 * KIB]), chunk(64 * KIB, data[: 64 * KIB])
        )
        assert over.code() is grpc.StatusCode.OUT_OF_RANGE

        huge = await send(start("u3", b"", total=CONFIG.upload_quota_bytes + 1))
        assert_over_quota(huge)
        async def only_start() -> AsyncIterator[pb.UploadRequest]:
            # u1 (3 chunks) and u2 (100 KiB) are unfinished: this fills the quota.
            yield start("u4", b"", total=CONFIG.upload_quota_bytes - 3 * CHUNK - 100 * KIB)

        assert (await stub.Upload(only_start())).committed_size == 0
        quota = await send(start("u5", b"", total=4 * CHUNK))
        assert_over_quota(quota)
        assert "quota" in (quota.details() or "")


async def test_the_client_stops_at_once_over_the_quota(
    home: Path, database: Database, tmp_path: Path
) -> None:
    """upload_file takes the quota refusal as final: one Upload call, the error raised
    as INSUFFICIENT_QUOTA, not retried with backoff as a dropped connection would be."""
    pki = TestPKI(home)
    path = tmp_path / "capture.bin"
    path.write_bytes(os.urandom(2 * CHUNK))
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        stub = device_stub(pki, server.port, "cam")
        held = await stub.Upload(iter([start("held", b"", total=CONFIG.upload_quota_bytes)]))
        assert held.committed_size == 0  # unfinished: it holds the whole quota
        upload = stub.Upload
        calls = []

        def counted(*args: object, **kwargs: object) -> object:
            calls.append(1)
            return upload(*args, **kwargs)

        stub.Upload = counted  # type: ignore[method-assign]
        with pytest.raises(FederationError) as refused:
            await upload_file(stub, path, chunk_size=CHUNK)
        assert refused.value.code is ErrorCode.INSUFFICIENT_QUOTA
        assert "quota" in refused.value.message
        assert len(calls) == 1
        assert await upload_status(stub, describe_file(path).upload_id) is None


async def test_two_writers_one_aborted(home: Path, database: Database) -> None:
    pki = TestPKI(home)
    data = os.urandom(2 * CHUNK)
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        stub = device_stub(pki, server.port, "cam")
        queue, first = await first_chunk_committed(stub, "shared", data)

        async def second() -> AsyncIterator[pb.UploadRequest]:
            yield start("shared", data)
            yield chunk(CHUNK, data[CHUNK:])

        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await stub.Upload(second())
        assert aborted.value.code() is grpc.StatusCode.ABORTED
        queue.put_nowait(chunk(CHUNK, data[CHUNK:]))
        queue.put_nowait(pb.UploadRequest(finish=True))
        queue.put_nowait(None)
        reply = await first
        assert reply.complete and reply.blob_digest == "sha256:" + hashlib.sha256(data).hexdigest()


async def test_digest_mismatch_discards_upload(home: Path, database: Database) -> None:
    pki = TestPKI(home)
    data = os.urandom(CHUNK)
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        stub = device_stub(pki, server.port, "cam")

        async def lying() -> AsyncIterator[pb.UploadRequest]:
            yield start("liar", b"something else", total=len(data))
            yield chunk(0, data)
            yield pb.UploadRequest(finish=True)

        with pytest.raises(grpc.aio.AioRpcError) as mismatch:
            await stub.Upload(lying())
        assert mismatch.value.code() is grpc.StatusCode.DATA_LOSS
        assert await upload_status(stub, "liar") is None
        assert not list((home / "blobs").rglob("*")) or not any(
            p.is_file() for p in (home / "blobs").rglob("*")
        )


async def test_a_failed_background_write_is_never_committed(
    home: Path, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks are written in a worker thread while the next one arrives: if a
    write fails, the bytes from its offset on are neither committed nor hashed,
    and the bytes before it still are."""
    from federation.edge import upload_session

    store = UploadStore(database.pool, CONFIG, home)
    data = os.urandom(4 * CHUNK)
    real = upload_session.UploadSession._absorb

    def flaky(self: upload_session.UploadSession, offset: int, chunk: bytes) -> None:
        if offset == 2 * CHUNK:
            raise OSError(28, "No space left on device")
        real(self, offset, chunk)

    monkeypatch.setattr(upload_session.UploadSession, "_absorb", flaky)
    session = await store.open("spiffe://t/edge/cam", "flaky", len(data),
                               hashlib.sha256(data).digest())
    with pytest.raises(OSError):
        async with session:
            for offset in range(0, len(data), CHUNK):
                await session.write(offset, data[offset : offset + CHUNK],
                                    crc32c(data[offset : offset + CHUNK]))
            await session.finish()
    status = await store.status("spiffe://t/edge/cam", "flaky")
    assert status.committed_size == 2 * CHUNK and not status.complete

    monkeypatch.setattr(upload_session.UploadSession, "_absorb", real)
    resumed = await store.open("spiffe://t/edge/cam", "flaky", len(data),
                               hashlib.sha256(data).digest())
    async with resumed:
        with pytest.raises(FederationError) as wrong:
            await resumed.write(3 * CHUNK, data[3 * CHUNK :], crc32c(data[3 * CHUNK :]))
        assert wrong.value.code is ErrorCode.FAILED_PRECONDITION
        for offset in range(2 * CHUNK, len(data), CHUNK):
            await resumed.write(offset, data[offset : offset + CHUNK],
                                crc32c(data[offset : offset + CHUNK]))
        digest = await resumed.finish()
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.blobs.path(digest).read_bytes() == data


async def test_an_upload_held_by_a_crashed_broker_resumes_when_its_lease_lapses(
    home: Path, database: Database, tmp_path: Path
) -> None:
    """A broker killed mid-upload cannot release its writer lease. The ABORTED answer
    says when the lease lapses (retry-after), and the client waits that long instead
    of spending its attempts on a backoff shorter than the lease."""
    pki = TestPKI(home)
    config = dataclasses.replace(CONFIG, upload_writer_lease_seconds=1.5)
    data = os.urandom(2 * CHUNK)
    path = tmp_path / "capture.bin"
    path.write_bytes(data)
    info = describe_file(path)
    async with broker_server(pki, database, home, config) as (server, broker, _):
        owner = Identity(pki.ca.trust_domain, "cam", "edge").spiffe_id
        crashed = await broker.uploads.open(  # a stream whose broker died: never closed
            owner, info.upload_id, len(data), hashlib.sha256(data).digest())
        stub = device_stub(pki, server.port, "cam")
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await stub.Upload(iter([start(info.upload_id, data)]))
        assert aborted.value.code() is grpc.StatusCode.ABORTED
        hint = dict(aborted.value.trailing_metadata() or ())[RETRY_AFTER_METADATA]
        assert 0 < int(hint) <= 1500
        digest = await upload_file(stub, path, chunk_size=CHUNK, attempts=3, info=info)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
        await crashed.close()  # late: its lease is gone, it releases nothing
    assert (home / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes() == data


async def test_abandoned_uploads_expire_and_free_the_quota(
    home: Path, database: Database
) -> None:
    """An unfinished upload nobody resumes must not hold the device's quota (and the
    broker's disk) for ever: after upload_expiry_seconds it is gone, part file too."""
    pki = TestPKI(home)
    config = dataclasses.replace(CONFIG, upload_expiry_seconds=0.5)
    data = os.urandom(CONFIG.upload_quota_bytes)
    async with broker_server(pki, database, home, config) as (server, broker, _):
        stub = device_stub(pki, server.port, "cam")
        reply = await stub.Upload(iter([start("abandoned", data), chunk(0, data[:CHUNK])]))
        assert reply.committed_size == CHUNK  # then the phone never comes back
        owner = Identity(pki.ca.trust_domain, "cam", "edge").spiffe_id
        part = broker.uploads.part_path(owner, "abandoned")
        assert part.stat().st_size == CHUNK
        small = b"x" * 100
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.Upload(iter([start("next", small), chunk(0, small)]))
        assert_over_quota(full.value)  # the quota is held

        async def forgotten() -> bool:
            return await upload_status(stub, "abandoned") is None

        for _ in range(200):
            if await forgotten():
                break
            await asyncio.sleep(0.02)
        assert await forgotten() and not part.exists()
        finished = await stub.Upload(iter([start("next", small), chunk(0, small),
                                           pb.UploadRequest(finish=True)]))
        assert finished.complete


_FAIL_AT_COMMIT = """
CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'the commit fails'; END $$;
CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER DELETE ON edge_uploads
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
"""


async def test_an_expiry_whose_commit_fails_keeps_the_part_file(
    home: Path, database: Database, tmp_path: Path
) -> None:
    """The part file of an expired upload goes only once the row's deletion committed:
    a deletion that fails at COMMIT leaves the row and its bytes, so the committed size
    the device would resume from is still true."""
    pki = TestPKI(home)
    data = os.urandom(4 * CHUNK)
    path = tmp_path / "capture.bin"
    path.write_bytes(data)
    info = describe_file(path)
    async with broker_server(pki, database, home, CONFIG, background=False) as (
            server, broker, _):
        stub = device_stub(pki, server.port, "cam")
        reply = await stub.Upload(iter([start(info.upload_id, data), chunk(0, data[:CHUNK])]))
        assert reply.committed_size == CHUNK
        owner = Identity(pki.ca.trust_domain, "cam", "edge").spiffe_id
        part = broker.uploads.part_path(owner, info.upload_id)
        await database.pool.execute(  # idle for longer than upload_expiry_seconds
            "UPDATE edge_uploads SET updated_at = now() - interval '2 days'")
        await database.pool.execute(_FAIL_AT_COMMIT)
        with pytest.raises(asyncpg.RaiseError):
            await broker.uploads.expire_stale()
        status = await upload_status(stub, info.upload_id)
        assert status is not None and status.committed_size == CHUNK
        assert part.stat().st_size == CHUNK
        await database.pool.execute("DROP TRIGGER refuse_at_commit ON edge_uploads")
        assert await broker.uploads.expire_stale() == 1
        assert await upload_status(stub, info.upload_id) is None and not part.exists()
        digest = await upload_file(stub, path, chunk_size=CHUNK, info=info)
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_device_revoked_mid_upload_is_refused_at_its_next_chunk(
    home: Path, database: Database
) -> None:
    """Authentication happens once per stream; a long upload must not outlive the
    device's revocation. What arrived before it stays committed, nothing after it."""
    pki = TestPKI(home)
    data = os.urandom(3 * CHUNK)
    async with broker_server(pki, database, home, CONFIG) as (server, broker, _):
        stub = device_stub(pki, server.port, "stolen")
        queue, call = await first_chunk_committed(stub, "capture", data)
        await broker.devices.revoke("stolen", actor="ops")
        queue.put_nowait(chunk(CHUNK, data[CHUNK : 2 * CHUNK]))
        queue.put_nowait(chunk(2 * CHUNK, data[2 * CHUNK :]))
        queue.put_nowait(pb.UploadRequest(finish=True))
        queue.put_nowait(None)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        committed = await database.pool.fetchval(
            "SELECT committed_size FROM edge_uploads WHERE upload_id = 'capture'")
        assert committed == CHUNK


async def test_a_device_downloads_only_its_own_blobs_and_its_jobs_payloads(
        home: Path, database: Database, tmp_path: Path) -> None:
    pki = TestPKI(home)
    mine, theirs = tmp_path / "mine.bin", tmp_path / "payload.bin"
    mine.write_bytes(os.urandom(3000))
    theirs.write_bytes(os.urandom(2000))
    async with broker_server(pki, database, home, CONFIG) as (server, _, _):
        cam, phone = (device_stub(pki, server.port, name) for name in ("cam", "phone"))
        ops = admin_stub(pki, server.port)
        own = await upload_file(cam, mine, chunk_size=CHUNK)
        payload = await upload_file(ops, theirs, chunk_size=CHUNK)

        async def refused(stub: Stub, digest: str) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await download_blob(stub, digest)
            return caught.value.code()

        assert await download_blob(cam, own) == mine.read_bytes()
        assert await refused(phone, own) is grpc.StatusCode.NOT_FOUND  # another's upload
        assert await refused(phone, payload) is grpc.StatusCode.NOT_FOUND  # no job yet
        unknown = "sha256:" + "0" * 64
        assert await refused(phone, unknown) is grpc.StatusCode.NOT_FOUND  # the same answer
        assert await refused(phone, "sha256:xyz") is grpc.StatusCode.INVALID_ARGUMENT

        await register(phone)
        await ops.SubmitJob(pb.SubmitJobRequest(tenant_id="t1", kind="echo",
                                                type=pb.JOB_TYPE_BATCH,
                                                payload_blob_digest=payload))
        lease = (await phone.LeaseJobs(pb.LeaseJobsRequest())).leases[0]
        assert await download_blob(phone, payload) == theirs.read_bytes()  # its job's input
        await phone.CompleteJob(pb.CompleteJobRequest(
            job_id=lease.job.job_id, fencing_token=lease.fencing_token, inline_result=b"ok"))
        assert await refused(phone, payload) is grpc.StatusCode.NOT_FOUND  # the lease ended
        assert await download_blob(ops, own) == mine.read_bytes()  # operators read any

        # A stored blob whose file is gone (a disk lost, a hand's cleanup) is the broker's
        # loss, not an unknown digest: it answered NOT_FOUND, as for a typo.
        (home / "blobs" / "sha256" / own[7:9] / own[7:]).unlink()
        for stub in (cam, ops):
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await download_blob(stub, own)
            assert lost.value.code() is grpc.StatusCode.DATA_LOSS
            assert "restore it from a backup" in str(lost.value.details())
        assert await refused(ops, unknown) is grpc.StatusCode.NOT_FOUND
