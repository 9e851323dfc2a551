"""Helpers for the guardian and vault tests: a real mTLS guardian node over real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from federation.channels import client_credentials
from federation.config import GrpcConfig, GuardianConfig
from federation.crypto.keyfile import load_or_create_key
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.guardian.checkpoints import CheckpointLog
from federation.guardian.custody import GuardianCustody
from federation.memory import AuditEntry, MemoryRecord
from federation.memory.store import MemoryStore
from federation.server import NodeServer
from nodes.guardian import GuardianServicer, registration
from tests.support import TestPKI


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclass
class SwitchableSink:
    """The real thermal memory, with a switch to make every write fail."""

    store: MemoryStore
    failing: bool = False
    written: list[AuditEntry] = field(default_factory=list)

    async def record(self, entry: AuditEntry) -> MemoryRecord:
        if self.failing:
            raise FederationError(ErrorCode.UNAVAILABLE, "thermal memory could not store it")
        self.written.append(entry)
        return await self.store.record(entry)


@dataclass
class GuardianNode:
    server: NodeServer
    custody: GuardianCustody
    checkpoints: CheckpointLog
    pki: TestPKI

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def channel(self, role: str, name: str = "test") -> grpc.aio.Channel:
        """An mTLS channel as ``role`` that reconnects quickly after a guardian restart."""
        return grpc.aio.secure_channel(
            self.address, client_credentials(self.pki.identity(role, name)),
            options=[
                ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 100),
            ],
        )


def build_guardian(
    database: Database, home: Path, sink: SwitchableSink, *,
    config: GuardianConfig | None = None, clock: FakeClock | None = None,
) -> tuple[GuardianCustody, CheckpointLog]:
    config = config or GuardianConfig()
    custody = GuardianCustody(
        database.pool, load_or_create_key(home / config.wrapping_key_file), sink, config,
        **({"clock": clock} if clock else {}),
    )
    log = CheckpointLog.open(home / config.checkpoint_file, home / config.signing_key_file)
    return custody, log


async def start_guardian(
    pki: TestPKI, custody: GuardianCustody, checkpoints: CheckpointLog, port: int = 0
) -> GuardianNode:
    server = NodeServer(
        [registration(GuardianServicer(custody, checkpoints))],
        trust_domain=pki.ca.trust_domain, grpc_config=GrpcConfig(grace_seconds=0.2),
        listen=f"127.0.0.1:{port}", credentials=pki.identity("guardian", "server"),
        metrics_port=None,
    )
    await server.start()
    return GuardianNode(server, custody, checkpoints, pki)
