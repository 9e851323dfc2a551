"""The edge broker's domain objects wired together, and its background work."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from federation.config import EdgeConfig, GrpcConfig
from federation.config.checks import check_edge_limits
from federation.db.errors import outage_error
from federation.edge.audit import AuditOutbox
from federation.edge.devices import DeviceRegistry, RevocationCache
from federation.edge.enrollment import Enrollment
from federation.edge.jobs import JobQueue
from federation.edge.reaper import Reaper
from federation.edge.uploads import UploadStore
from federation.memory.sink import AuditSink
from federation.periodic import cancel_all
from federation.pki import EdgeSigner

log = logging.getLogger(__name__)


def check_limits(edge: EdgeConfig, grpc: GrpcConfig) -> None:
    """The broker's size limits must be coherent and fit in a gRPC message (checked when
    the settings are loaded too; here for settings built in code)."""
    check_edge_limits(edge, grpc)


@dataclass
class EdgeBroker:
    config: EdgeConfig
    queue: JobQueue
    devices: DeviceRegistry
    revocations: RevocationCache
    uploads: UploadStore
    enrollment: Enrollment | None
    """``None`` when this process has no edge CA key: Enroll/RenewCertificate are UNAVAILABLE."""
    reaper: Reaper
    outbox: AuditOutbox

    @classmethod
    def create(
        cls,
        pool: asyncpg.Pool,
        config: EdgeConfig,
        home: Path,
        signer: EdgeSigner | None,
        sink: AuditSink | None,
    ) -> EdgeBroker:
        devices = DeviceRegistry(pool, config)
        return cls(
            config=config,
            queue=JobQueue(pool, config),
            devices=devices,
            revocations=RevocationCache(devices, config.revocation_cache_seconds),
            uploads=UploadStore(pool, config, home),
            enrollment=(Enrollment(pool, config, signer.issuer, signer.root)
                        if signer is not None else None),
            reaper=Reaper(pool, config),
            outbox=AuditOutbox(pool, sink),
        )

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """Run the reaper and the audit outbox drain until the block exits."""
        tasks = [
            asyncio.create_task(self.reaper.run(), name="edge-reaper"),
            asyncio.create_task(
                self.outbox.run(self.config.audit_flush_seconds), name="edge-audit-outbox"
            ),
            asyncio.create_task(self._expire_uploads(), name="edge-upload-expiry"),
        ]
        try:
            yield
        finally:
            await cancel_all(tasks)
            # Best effort: deliver what the last calls queued before the pool closes.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.outbox.flush_once(), timeout=2)

    async def _expire_uploads(self) -> None:
        """Forget abandoned uploads, a tenth of their expiry apart (at most a minute)."""
        interval = min(max(self.config.upload_expiry_seconds / 10, 0.05), 60.0)
        while True:
            try:
                await self.uploads.expire_stale()
            except Exception as exc:  # an outage must not end the sweep
                if outage_error(exc) is None:
                    log.exception("upload expiry failed; retrying")
            await asyncio.sleep(interval)

    def heartbeat_interval(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.config.heartbeat_interval_seconds)
