"""The device side of the edge broker: enrollment, credentials and resumable upload.

What a phone app would do, written once and used by ``federation edge …``,
the tests and the benchmark. The agent loop is in :mod:`federation.edge.device.agent`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation.channels import secure_channel
from federation.config import GrpcConfig
from federation.edge.checksum import crc32c
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.periodic import TaskSet
from federation.pki import CertificateFiles, Identity, PKIError, write_private_file
from federation.v1 import edge_broker_pb2 as pb
from federation.v1 import edge_broker_pb2_grpc

CERT_FILE, KEY_FILE, CA_FILE = "cert.pem", "key.pem", "ca.pem"

if TYPE_CHECKING:  # the async stub class exists only in the type stubs
    Stub = edge_broker_pb2_grpc.EdgeBrokerServiceAsyncStub
else:
    Stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub

RETRYABLE_UPLOAD_ERRORS = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.ABORTED, ErrorCode.CANCELLED, ErrorCode.DEADLINE_EXCEEDED,
     ErrorCode.INTERNAL}
)
"""Failures after which an upload asks for the committed offset and resumes."""

QUOTA_ERRORS = frozenset({ErrorCode.INSUFFICIENT_QUOTA})
"""The broker refused the upload for the device's upload quota (gRPC RESOURCE_EXHAUSTED,
error-code ``insufficient_quota``): not in :data:`RETRYABLE_UPLOAD_ERRORS`, so raised at
once, since sending again cannot help until the device's unfinished uploads finish or
expire. Not a transport failure either: the agent fails the job rather than waiting."""

_MAX_RETRY_HINT_SECONDS = 120.0
"""Longest wait a broker's retry-after hint can impose between upload attempts."""


# -- enrollment -----------------------------------------------------------------


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key (it never leaves the device) and a DER CSR over it.

    The broker ignores the CSR's subject; it is set only for readability.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-device")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _chain_pem(certificate_der: bytes, chain_der: Sequence[bytes]) -> bytes:
    """The device's certificate followed by the intermediate(s) it presents with it."""
    return b"".join(_der_to_pem(der) for der in (certificate_der, *chain_der))


async def enroll(
    broker: str, ca_pem: bytes, token: str, device_name: str, out_dir: Path,
    rpc_seconds: float = 30.0,
) -> pb.EnrollResponse:
    """Enroll over the broker's enrollment port (TLS, no client certificate)."""
    key, csr_der = new_key_and_csr()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(broker, credentials) as channel:
        stub = edge_broker_pb2_grpc.EdgeBrokerServiceStub(channel)
        try:
            reply: pb.EnrollResponse = await stub.Enroll(
                pb.EnrollRequest(token=token, csr_der=csr_der, device_name=device_name),
                timeout=rpc_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
    write_private_file(out_dir / KEY_FILE, _key_pem(key))
    (out_dir / CERT_FILE).write_bytes(_chain_pem(reply.certificate_der, reply.chain_der))
    (out_dir / CA_FILE).write_bytes(_der_to_pem(reply.ca_certificate_der))
    return reply


def device_files(cert_dir: Path) -> CertificateFiles:
    """The device's credentials as written by :func:`enroll`."""
    _finish_renewal(cert_dir)
    cert_path = cert_dir / CERT_FILE
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{cert_path} is missing; run `federation edge enroll` first") from None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or "/edge/" not in uris[0]:
        raise PKIError(f"{cert_path} is not an edge device certificate")
    trust_domain = uris[0].removeprefix("spiffe://").split("/", 1)[0]
    identity = Identity(trust_domain, uris[0].rsplit("/", 1)[1], "edge")
    return CertificateFiles(identity, cert_path, cert_dir / KEY_FILE, cert_dir / CA_FILE)


async def renew_certificate(
    stub: Stub, cert_dir: Path, rpc_seconds: float = 30.0
) -> None:
    """Swap in a fresh certificate on a new key; callers rebuild their channel."""
    key, csr_der = new_key_and_csr()
    reply: pb.RenewCertificateResponse = await stub.RenewCertificate(
        pb.RenewCertificateRequest(csr_der=csr_der), timeout=rpc_seconds
    )
    # Both files are written in full beside the live ones, then swapped in. A crash
    # between the two renames leaves the ``.new`` cert behind, and device_files()
    # finishes the swap, so the key and certificate on disk always match.
    write_private_file(_pending(cert_dir / KEY_FILE), _key_pem(key))
    write_private_file(_pending(cert_dir / CERT_FILE),
                       _chain_pem(reply.certificate_der, reply.chain_der))
    _finish_renewal(cert_dir)


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _finish_renewal(cert_dir: Path) -> None:
    """Move a fully written renewal into place: the key first, the certificate last
    (its ``.new`` file marks an unfinished swap)."""
    if not _pending(cert_dir / CERT_FILE).exists():
        return
    for name in (KEY_FILE, CERT_FILE):
        if _pending(cert_dir / name).exists():
            os.replace(_pending(cert_dir / name), cert_dir / name)


def device_channel(broker: str, cert_dir: Path, config: GrpcConfig) -> grpc.aio.Channel:
    return secure_channel(broker, device_files(cert_dir), config)


class DeviceChannels:
    """A device's channel to its broker, replaced after a certificate renewal.

    A live channel keeps presenting the certificate it was built with, so after a
    renewal :meth:`rebuild` builds a new one for new calls and retires the old one:
    it closes once its calls in flight are done, or after ``retire_grace_seconds``
    (cancelling what is left), instead of piling up for the life of the agent.
    """

    def __init__(self, broker: str, cert_dir: Path, config: GrpcConfig,
                 *, retire_grace_seconds: float = 30.0) -> None:
        self._broker, self._cert_dir, self._config = broker, cert_dir, config
        self._grace = retire_grace_seconds
        self.channel = device_channel(broker, cert_dir, config)
        self._retiring = TaskSet()
        self.retired = 0
        """Replaced channels closed so far."""

    def stub(self) -> Stub:
        return edge_broker_pb2_grpc.EdgeBrokerServiceStub(self.channel)

    def rebuild(self) -> Stub:
        """A stub on a new channel from the credentials now on disk."""
        self._retiring.spawn(self._retire(self.channel))
        self.channel = device_channel(self._broker, self._cert_dir, self._config)
        return self.stub()

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        await channel.close(grace=self._grace)
        self.retired += 1

    async def close(self) -> None:
        await self.channel.close()
        await self._retiring.wait()


# -- uploads --------------------------------------------------------------------

Progress = Callable[[int, int], None]
"""Called with (bytes committed or sent, total bytes)."""


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int
    sha256: bytes

    @property
    def upload_id(self) -> str:
        """Derived from the content, so a re-run after a kill resumes the same upload."""
        return f"sha256-{self.sha256.hex()}"


def describe_file(path: Path) -> FileInfo:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return FileInfo(path, path.stat().st_size, digest.digest())


async def upload_status(
    stub: Stub, upload_id: str
) -> pb.QueryUploadStatusResponse | None:
    try:
        status: pb.QueryUploadStatusResponse = await stub.QueryUploadStatus(
            pb.QueryUploadStatusRequest(upload_id=upload_id), timeout=30
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return status


async def _upload_messages(
    info: FileInfo, upload_id: str, offset: int, chunk_size: int, progress: Progress | None
) -> AsyncIterator[pb.UploadRequest]:
    yield pb.UploadRequest(
        start=pb.UploadStart(upload_id=upload_id, total_size=info.size, sha256=info.sha256)
    )
    with open(info.path, "rb") as f:
        f.seek(offset)
        while offset < info.size:
            data = f.read(chunk_size)
            yield pb.UploadRequest(
                chunk=pb.UploadChunk(offset=offset, data=data, crc32c=crc32c(data))
            )
            offset += len(data)
            if progress is not None:
                progress(offset, info.size)
    yield pb.UploadRequest(finish=True)


async def upload_file(
    stub: Stub,
    path: Path,
    *,
    chunk_size: int = 1 << 20,
    progress: Progress | None = None,
    attempts: int = 8,
    info: FileInfo | None = None,
) -> str:
    """Upload ``path``; resume from the committed offset after any disconnect.

    Returns the stored blob's digest (``sha256:<hex>``). A refusal for the device's
    upload quota (:data:`QUOTA_ERRORS`) or any other answer that is not a transport or
    concurrency failure (:data:`RETRYABLE_UPLOAD_ERRORS`) is raised at once.
    """
    if info is None:
        info = await asyncio.to_thread(describe_file, path)
    delay = 0.2
    for attempt in range(attempts):
        status = await _status_or_none(stub, info.upload_id)
        if status is not None and status.complete:
            return str(status.blob_digest)
        offset = status.committed_size if status is not None else 0
        try:
            reply: pb.UploadResponse = await stub.Upload(
                _upload_messages(info, info.upload_id, offset, chunk_size, progress)
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if error.code not in RETRYABLE_UPLOAD_ERRORS or attempt == attempts - 1:
                raise error from exc  # QUOTA_ERRORS among them: sending again cannot help
            # The broker's hint counts: an upload still held by a stream of a broker that
            # crashed is free only when that writer lease lapses, later than the backoff.
            hint = min(error.retry_after_seconds or 0.0, _MAX_RETRY_HINT_SECONDS)
            await asyncio.sleep(max(delay * (0.5 + random.random() / 2), hint))
            delay = min(delay * 2, 10.0)
            continue
        if reply.complete:
            return str(reply.blob_digest)
    raise FederationError(ErrorCode.UNAVAILABLE, f"upload of {path} did not complete")


async def _status_or_none(
    stub: Stub, upload_id: str
) -> pb.QueryUploadStatusResponse | None:
    try:
        return await upload_status(stub, upload_id)
    except grpc.aio.AioRpcError as exc:
        if from_rpc_error(exc).code in RETRYABLE_UPLOAD_ERRORS:
            return None  # unknown: the stream will tell us the committed offset
        raise from_rpc_error(exc) from exc


async def download_blob(
    stub: Stub, digest: str, offset: int = 0
) -> bytes:
    parts = []
    async for reply in stub.Download(pb.DownloadRequest(blob_digest=digest, offset=offset)):
        parts.append(reply.data)
    return b"".join(parts)


class ProgressBar:
    """``bytes/total  rate  ETA`` on one self-rewriting stderr line."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._first: int | None = None
        self._last_draw = 0.0
        self._min_interval = min_interval

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = done
        if now - self._last_draw < self._min_interval and done < total:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-6)
        rate = (done - self._first) / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / total) if total else width
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {_size(done)}/{_size(total)} "
            f"{_size(int(rate))}/s ETA {_eta(eta)}   "
        )
        print(line, end="", file=self._stream, flush=True)

    def close(self) -> None:
        """End the bar's line; nothing when no bar was drawn (an upload that failed
        before its first chunk leaves no empty line above its error)."""
        if self._first is not None:
            print(file=self._stream)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"

