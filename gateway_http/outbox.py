"""A durable outbox for the work the gateway does after it has decided an answer.

Refusals and failures are audited without making the caller wait for thermal
memory, but they must not be lost when the memory node or the database is down
for a while, nor when the gateway itself is killed. So each such record is first
appended to a local spool file and fsynced (concurrent writers share one fsync),
and only then is the answer sent; a delivery task sends spooled records on, retries
with exponential backoff while the receiver is down, and replays whatever is left
when the gateway starts again.

On disk, under ``gateway.outbox_dir`` (relative to the home), each gateway process
takes the first free numbered slot (``0/``, ``1/``, …; an ``flock`` on ``lock`` says
a slot is taken), so several gateways can share a home and a restarted one resumes
what a dead one left. A slot holds ``entries.jsonl`` (one JSON object per record:
``id``, ``kind``, ``payload``) and ``acked.txt`` (ids delivered). A torn last line
from a crash is ignored. A record whose delivery is not yet acknowledged on disk
when the gateway dies is delivered again: at least once, never zero times.

The outbox is bounded (``gateway.outbox_max_records``): when it is full, the gateway
answers new requests 503 rather than serve requests it could not audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from federation.durable import fsync_directory
from federation.errors import ErrorCode, FederationError
from federation.periodic import cancel_all

log = logging.getLogger(__name__)

Deliver = Callable[[Mapping[str, Any]], Awaitable[None]]
"""Sends one record on; raises when it could not (the record is retried)."""

_MAX_SLOTS = 64
_COMPACT_AFTER_ACKS = 1_000
_DELIVERY_CONCURRENCY = 16


@dataclass(frozen=True)
class OutboxConfig:
    directory: Path
    max_records: int
    retry_initial_seconds: float
    retry_max_seconds: float


@dataclass(frozen=True)
class Record:
    id: str
    kind: str
    payload: Mapping[str, Any]

    def line(self) -> bytes:
        data = {"id": self.id, "kind": self.kind, "payload": self.payload}
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class OutboxFull(FederationError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE,
            f"the audit backlog is full ({limit} records waiting for thermal memory): "
            "requests are refused until it drains",
            retry_after_seconds=5.0,
        )


class OutboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge(
            "federation_gateway_outbox_depth",
            "Records spooled on disk and not yet delivered (audit records of refusals "
            "and failures, quota settlements).", registry=registry)
        self.delivered = Counter(
            "federation_gateway_outbox_delivered_total", "Records delivered from the outbox.",
            ("kind",), registry=registry)
        self.delivery_failures = Counter(
            "federation_gateway_outbox_delivery_failures_total",
            "Delivery attempts that failed and will be retried.", ("kind",), registry=registry)


class _Spool:
    """The slot's files. Every method blocks (file I/O, fsync): call it in a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._entries_path = directory / "entries.jsonl"
        self._acked_path = directory / "acked.txt"
        self._entries: IO[bytes] | None = None
        self._acked: IO[bytes] | None = None
        self.acks_since_compaction = 0

    def open(self) -> list[Record]:
        """Open for appending; the records not yet acknowledged, oldest first."""
        pending = self._load()
        self._entries = open(self._entries_path, "ab")  # noqa: SIM115 - kept open
        self._acked = open(self._acked_path, "ab")  # noqa: SIM115 - kept open
        fsync_directory(self.directory)
        return pending

    def close(self) -> None:
        for handle in (self._entries, self._acked):
            if handle is not None:
                handle.close()
        self._entries = self._acked = None

    def append(self, records: list[Record]) -> None:
        assert self._entries is not None
        self._entries.write(b"".join(r.line() for r in records))
        self._entries.flush()
        os.fsync(self._entries.fileno())

    def ack(self, ids: list[str]) -> None:
        assert self._acked is not None
        self._acked.write("".join(f"{i}\n" for i in ids).encode())
        self._acked.flush()
        os.fsync(self._acked.fileno())
        self.acks_since_compaction += len(ids)

    def compact(self, pending: list[Record]) -> None:
        """Rewrite the entries file with only ``pending``, then empty the acks. The order
        matters: a crash in between leaves acks of records that no longer exist, which
        is harmless, never a delivered record without its ack."""
        assert self._entries is not None and self._acked is not None
        fresh = self._entries_path.with_suffix(".tmp")
        with open(fresh, "wb") as handle:
            handle.write(b"".join(r.line() for r in pending))
            handle.flush()
            os.fsync(handle.fileno())
        self._entries.close()
        fresh.replace(self._entries_path)
        fsync_directory(self.directory)
        self._entries = open(self._entries_path, "ab")  # noqa: SIM115 - kept open
        self._acked.truncate(0)
        os.fsync(self._acked.fileno())
        self.acks_since_compaction = 0

    def _load(self) -> list[Record]:
        acked = set()
        if self._acked_path.exists():
            acked = set(self._acked_path.read_text(errors="replace").split())
        pending: list[Record] = []
        if self._entries_path.exists():
            for number, line in enumerate(self._entries_path.read_bytes().splitlines(), 1):
                record = _parse(line)
                if record is None:
                    log.warning("outbox: skipped an unreadable line (a torn write?)",
                                extra={"file": str(self._entries_path), "line": number})
                elif record.id not in acked:
                    pending.append(record)
        return pending


def _parse(line: bytes) -> Record | None:
    try:
        data = json.loads(line)
        return Record(str(data["id"]), str(data["kind"]), dict(data["payload"]))
    except (ValueError, KeyError, TypeError):
        return None


def _fail(batch: list[tuple[Record, asyncio.Future[None]]], error: FederationError) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(error)


class Outbox:
    """``start()`` takes a slot and replays it; ``stop()`` delivers what it can in the
    grace period, then leaves the rest on disk for the next start."""

    def __init__(self, config: OutboxConfig, metrics: OutboxMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._handlers: dict[str, Deliver] = {}
        self._pending: dict[str, Record] = {}
        self._spool: _Spool | None = None
        self._lock_file: IO[bytes] | None = None
        self._unsynced: list[tuple[Record, asyncio.Future[None]]] = []
        self._wake_writer = asyncio.Event()
        self._wake_deliverer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._io = asyncio.Lock()  # one thread at a time touches the files
        self._failing = False
        """Whether the last delivery attempt failed (the receiver is down)."""

    def register(self, kind: str, deliver: Deliver) -> None:
        self._handlers[kind] = deliver

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._unsynced)

    @property
    def full(self) -> bool:
        return self.depth >= self._config.max_records

    @property
    def slot(self) -> Path | None:
        return self._spool.directory if self._spool else None

    async def start(self) -> None:
        slot, self._lock_file = await asyncio.to_thread(self._take_slot)
        self._spool = _Spool(slot)
        replayed = await asyncio.to_thread(self._spool.open)
        unknown = [r for r in replayed if r.kind not in self._handlers]
        if unknown:
            log.error("outbox: records of unknown kinds kept on disk",
                      extra={"kinds": sorted({r.kind for r in unknown}), "slot": str(slot)})
        self._pending = {r.id: r for r in replayed if r.kind in self._handlers}
        self._metrics.depth.set(self.depth)
        if self._pending:
            log.info("outbox: replaying records left by an earlier run",
                     extra={"records": len(self._pending), "slot": str(slot)})
        self._tasks = [asyncio.create_task(self._write_loop(), name="outbox-writer"),
                       asyncio.create_task(self._deliver_loop(), name="outbox-deliverer")]
        self._wake_deliverer.set()

    async def drain(self, timeout_seconds: float = 5.0, *, while_failing: bool = True) -> bool:
        """Wait until every record is delivered (or the timeout); whether it was.
        ``while_failing=False`` gives up as soon as the receiver refuses a delivery."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_seconds):
                while self.depth and (while_failing or not self._failing or self._unsynced):
                    self._wake_writer.set()
                    self._wake_deliverer.set()
                    await asyncio.sleep(0.02)
        return self.depth == 0

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Flush what is being spooled and try to deliver the rest within the grace period;
        with the receiver down, what is on disk waits for the next start."""
        if not self._tasks:
            return
        await self.drain(grace_seconds, while_failing=False)
        await cancel_all(self._tasks)
        self._tasks = []
        self._fail_unsynced(FederationError(ErrorCode.UNAVAILABLE, "the outbox is stopping"))
        if self._pending:
            log.warning("outbox: records left for the next start",
                        extra={"records": len(self._pending)})
        if self._spool is not None:
            self._spool.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the slot's flock
            self._lock_file = None

    async def put(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Return once the record is on disk (fsynced); :class:`OutboxFull` when full."""
        if kind not in self._handlers:
            raise ValueError(f"no delivery registered for outbox records of kind {kind!r}")
        if not self._tasks:
            raise FederationError(ErrorCode.UNAVAILABLE, "the outbox is not running")
        if self.full:
            raise OutboxFull(self._config.max_records)
        record = Record(uuid.uuid4().hex, kind, dict(payload))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsynced.append((record, done))
        self._metrics.depth.set(self.depth)
        self._wake_writer.set()
        await asyncio.shield(done)

    # -- writing -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._unsynced:
                batch, self._unsynced = self._unsynced, []
                await self._write(batch)

    async def _write(self, batch: list[tuple[Record, asyncio.Future[None]]]) -> None:
        assert self._spool is not None
        records = [record for record, _ in batch]
        try:
            async with self._io:
                await asyncio.to_thread(self._spool.append, records)
        except asyncio.CancelledError:
            _fail(batch, FederationError(ErrorCode.UNAVAILABLE, "the outbox is stopping"))
            raise
        except OSError as exc:
            log.exception("outbox: could not write the spool file")
            error = FederationError(ErrorCode.UNAVAILABLE,
                                    "the audit outbox could not be written")
            error.__cause__ = exc
            _fail(batch, error)
            self._metrics.depth.set(self.depth)
            return
        for record in records:
            self._pending[record.id] = record
        for _, done in batch:
            if not done.done():
                done.set_result(None)
        self._wake_deliverer.set()

    def _fail_unsynced(self, error: FederationError) -> None:
        batch, self._unsynced = self._unsynced, []
        _fail(batch, error)

    # -- delivering ----------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        delay = self._config.retry_initial_seconds
        while True:
            if not self._pending:
                await self._wake_deliverer.wait()
            self._wake_deliverer.clear()
            batch = list(self._pending.values())[:_DELIVERY_CONCURRENCY]
            if not batch:
                continue
            delivered = await self._deliver(batch)
            if delivered:
                await self._acknowledge(delivered)
            self._failing = len(delivered) < len(batch)
            if self._failing:
                await self._back_off(delay)
                delay = min(delay * 2, self._config.retry_max_seconds)
            else:
                delay = self._config.retry_initial_seconds

    async def _deliver(self, batch: list[Record]) -> list[str]:
        results = await asyncio.gather(*(self._deliver_one(r) for r in batch))
        return [r.id for r, ok in zip(batch, results, strict=True) if ok]

    async def _deliver_one(self, record: Record) -> bool:
        try:
            await self._handlers[record.kind](record.payload)
        except Exception as exc:
            self._metrics.delivery_failures.labels(record.kind).inc()
            log.warning("outbox: delivery failed; will retry",
                        extra={"kind": record.kind, "error": str(exc)[:200]})
            return False
        self._metrics.delivered.labels(record.kind).inc()
        return True

    async def _acknowledge(self, ids: list[str]) -> None:
        assert self._spool is not None
        async with self._io:
            await asyncio.to_thread(self._spool.ack, ids)
            for record_id in ids:
                self._pending.pop(record_id, None)
            if self._spool.acks_since_compaction >= _COMPACT_AFTER_ACKS:
                await asyncio.to_thread(self._spool.compact, list(self._pending.values()))
        self._metrics.depth.set(self.depth)

    async def _back_off(self, delay: float) -> None:
        """Sleep ``delay`` (a new record does not cut it short: the receiver is down)."""
        await asyncio.sleep(delay)

    # -- slots -----------------------------------------------------------------------------

    def _take_slot(self) -> tuple[Path, IO[bytes]]:
        base = self._config.directory
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        for number in range(_MAX_SLOTS):
            slot = base / str(number)
            slot.mkdir(exist_ok=True, mode=0o700)
            handle = open(slot / "lock", "ab")  # noqa: SIM115 - held for the process's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return slot, handle
        raise FederationError(ErrorCode.UNAVAILABLE,
                              f"every outbox slot under {base} is taken by a running gateway")
