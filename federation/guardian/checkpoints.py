"""Guardian-signed checkpoints of the thermal-memory chain head, kept off the database.

Why: the audit chain lives in PostgreSQL, and whoever owns the database can
edit a record and recompute every hash after it; the chain then verifies. A
checkpoint is the guardian's Ed25519 signature over ``(sequence, head hash,
sign time)``, stored by the guardian in an append-only JSON-lines file under
its home (``guardian/checkpoints.jsonl``), not in the database. Verification
compares the chain against every checkpoint: a rewrite that reaches back before
a checkpoint changes that record's hash and is caught, and the report names the
first record after the last checkpoint that still matches.

Design (the simplest robust one): *the memory node pushes*. It is the only
writer of the chain, so it knows when N records have been appended; it calls
``GuardianService.SignCheckpoint(sequence, hash)`` every N records or T seconds
(whichever first, and only when the head moved), using
:class:`CheckpointScheduler` below. The guardian refuses to sign a sequence at
or below the last one it signed with a different hash: such a request is itself
evidence of a rewrite. Records after the newest checkpoint are protected only
by the chain itself until the next checkpoint (at most N records / T seconds).

Checkpoints are not themselves written to thermal memory (each would add a
record and so trigger the next checkpoint forever); the signed log is their
audit trail.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from federation.clock import Clock, utc_now
from federation.crypto.keyfile import load_or_create_key
from federation.durable import write_all
from federation.errors import ErrorCode, FederationError
from federation.guardian.chain_links import ChainLinks, check_link
from federation.periodic import cancel_and_wait
from federation.pki.files import write_file

log = logging.getLogger(__name__)

_TAG: Final = b"federation.checkpoint.v1\x00"
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
HASH_BYTES: Final = 32
PUBLIC_KEY_SUFFIX: Final = ".pub"


def _micros(moment: dt.datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def signed_message(sequence: int, chain_head_hash: bytes, sign_time: dt.datetime) -> bytes:
    return _TAG + struct.pack(">q", sequence) + chain_head_hash + struct.pack(
        ">q", _micros(sign_time)
    )


def fingerprint(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    sequence: int
    chain_head_hash: bytes
    sign_time: dt.datetime
    signature: bytes
    key_fingerprint: str

    def verify(self, keys: GuardianKeys) -> bool:
        """Signed by the guardian key it names, one of ``keys``."""
        public_key = keys.by_fingerprint.get(self.key_fingerprint)
        if public_key is None:
            return False
        try:
            public_key.verify(
                self.signature, signed_message(self.sequence, self.chain_head_hash, self.sign_time)
            )
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        return json.dumps({
            "sequence": self.sequence, "chain_head_hash": self.chain_head_hash.hex(),
            "sign_time_us": _micros(self.sign_time), "signature": self.signature.hex(),
            "key_fingerprint": self.key_fingerprint,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Checkpoint:
        data = json.loads(line)
        return cls(
            sequence=int(data["sequence"]),
            chain_head_hash=bytes.fromhex(data["chain_head_hash"]),
            sign_time=_EPOCH + dt.timedelta(microseconds=int(data["sign_time_us"])),
            signature=bytes.fromhex(data["signature"]),
            key_fingerprint=str(data["key_fingerprint"]),
        )


@dataclass(frozen=True)
class GuardianKeys:
    """The guardian's checkpoint verification keys: the one it signs with now, then
    every one it signed with before (a signing key lost or replaced). Checkpoints
    signed before a key change verify with the key they name, so old checkpoints
    stay evidence after the change."""

    by_fingerprint: Mapping[str, Ed25519PublicKey]
    """Newest first; never empty."""

    @classmethod
    def of(cls, *keys: Ed25519PublicKey) -> GuardianKeys:
        return cls({fingerprint(k): k for k in keys})

    @property
    def current(self) -> Ed25519PublicKey:
        return next(iter(self.by_fingerprint.values()))

    def pem(self) -> bytes:
        """The ``.pub`` file's content: one PEM block per key, newest first."""
        return b"".join(k.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
                        for k in self.by_fingerprint.values())


_PEM_BLOCK: Final = re.compile(
    rb"-----BEGIN PUBLIC KEY-----\r?\n.+?-----END PUBLIC KEY-----\r?\n?", re.DOTALL)


def load_signing_key(path: Path) -> tuple[Ed25519PrivateKey, GuardianKeys]:
    """The guardian's signing key (raw 32 bytes, 0600), created on first use, and the keys
    its checkpoints verify with. Those are written next to it as ``<name>.pub`` (PEM,
    public) for verifiers: its own key first, then the keys the file named before, so
    that when the signing key is lost or replaced, old checkpoints still verify."""
    key = Ed25519PrivateKey.from_private_bytes(load_or_create_key(path, size=32))
    public_path = public_key_path(path)
    earlier = load_public_keys(public_path) if public_path.exists() else None
    keys = GuardianKeys.of(key.public_key(),
                           *(earlier.by_fingerprint.values() if earlier else ()))
    if earlier is not None and fingerprint(earlier.current) != fingerprint(keys.current):
        log.warning("the checkpoint signing key changed: the earlier public keys stay in "
                    "the .pub file, after the new one, to verify older checkpoints",
                    extra={"path": str(public_path),
                           "new_fingerprint": fingerprint(keys.current),
                           "earlier": len(earlier.by_fingerprint)})
    pem = keys.pem()
    if not public_path.exists() or public_path.read_bytes() != pem:
        write_file(public_path, pem)
    return key, keys


def public_key_path(signing_key_path: Path) -> Path:
    """Where the verification keys of the signing key at ``signing_key_path`` are."""
    return signing_key_path.with_name(signing_key_path.name + PUBLIC_KEY_SUFFIX)


def load_public_keys(path: Path) -> GuardianKeys:
    """A guardian's checkpoint verification keys from its ``.pub`` file (one PEM block per
    key, newest first; a file written before key changes were kept holds one)."""
    blocks = _PEM_BLOCK.findall(path.read_bytes())
    if not blocks:
        raise ValueError(f"{path} holds no PEM public key")
    keys: list[Ed25519PublicKey] = []
    for block in blocks:
        key = serialization.load_pem_public_key(block)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path} holds a key that is not Ed25519")
        keys.append(key)
    return GuardianKeys.of(*keys)


class CheckpointLog:
    """The guardian's signed checkpoints: an append-only, fsynced JSON-lines file."""

    def __init__(
        self, path: Path, signing_key: Ed25519PrivateKey,
        clock: Clock = utc_now, *, keys: GuardianKeys | None = None,
        chain: ChainLinks | None = None,
    ) -> None:
        """``keys``: the keys the log's lines may be signed with (from the ``.pub`` file,
        see :func:`load_signing_key`); the signing key's own is always one.
        ``chain``: where a request is checked against the chain before it is signed
        (``None``: not checked, for a log with no chain to ask)."""
        self._path = path
        self._chain = chain
        self._key = signing_key
        self._public = signing_key.public_key()
        self._fingerprint = fingerprint(self._public)
        self._keys = GuardianKeys.of(
            self._public, *(keys.by_fingerprint.values() if keys is not None else ()))
        self._clock = clock
        self._lock = asyncio.Lock()
        self._checkpoints: list[Checkpoint] = []
        """Strictly increasing by sequence: looked up by bisection, so a verification's
        paging through a year of checkpoints is not quadratic."""
        self._load()

    @classmethod
    def open(cls, path: Path, signing_key_path: Path, clock: Clock = utc_now, *,
             chain: ChainLinks | None = None) -> CheckpointLog:
        """The log at ``path``, signed with the key at ``signing_key_path`` (created on
        first use), its older lines checked with the earlier keys of its ``.pub`` file."""
        signing_key, keys = load_signing_key(signing_key_path)
        return cls(path, signing_key, clock, keys=keys, chain=chain)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    @property
    def keys(self) -> GuardianKeys:
        """The keys this log's checkpoints verify with, the current one first."""
        return self._keys

    def _load(self) -> None:
        if not self._path.exists():
            return
        lines = self._path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                checkpoint = Checkpoint.from_json(line)
            except (ValueError, KeyError):
                if number == len(lines):  # a write cut short by a crash: drop it
                    log.warning("ignoring a truncated last checkpoint line")
                    self._cut_torn_last_line()
                    continue
                raise
            if checkpoint.key_fingerprint not in self._keys.by_fingerprint:
                raise ValueError(
                    f"{self._path}:{number}: checkpoint {checkpoint.sequence} is signed by "
                    f"key {checkpoint.key_fingerprint[:16]}…, which is neither the signing "
                    "key nor one of the earlier keys in its .pub file: put that key's public "
                    "PEM back at the end of the .pub file (from a backup or a verifier's copy)")
            if not checkpoint.verify(self._keys):
                raise ValueError(f"{self._path}:{number}: checkpoint signature does not verify")
            last = self._checkpoints[-1] if self._checkpoints else None
            if last is not None and (checkpoint.sequence, checkpoint.chain_head_hash) == (
                    last.sequence, last.chain_head_hash):
                # A sequence signed twice by a guardian before c3cf816 (a cancelled call's
                # retry): the same evidence twice, kept once.
                log.warning("ignoring a second checkpoint of the same record",
                            extra={"line": number, "sequence": checkpoint.sequence})
                continue
            self._add(checkpoint)

    async def sign(self, sequence: int, chain_head_hash: bytes) -> Checkpoint:
        if sequence < 1:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "sequence must be at least 1",
                                  param="sequence")
        if len(chain_head_hash) != HASH_BYTES:
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "chain_head_hash must be 32 bytes",
                                  param="chain_head_hash")
        if self._chain is not None:  # before the lock: it is a call to the memory node
            check_link(sequence, chain_head_hash, await self._chain.link(sequence))
        # Shielded: a caller that goes away (its deadline, a cancelled RPC) while the line
        # is being written in a thread must not leave it in the file but not in memory.
        # A retry would then sign the same sequence again, a second line for it.
        return await asyncio.shield(self._sign(sequence, chain_head_hash))

    async def _sign(self, sequence: int, chain_head_hash: bytes) -> Checkpoint:
        async with self._lock:
            if self._checkpoints:
                last = self._checkpoints[-1]
                existing = self.get(sequence) if sequence <= last.sequence else None
                if existing is not None and existing.chain_head_hash == chain_head_hash:
                    return existing  # a retried request: idempotent
                if sequence <= last.sequence:
                    log.error("checkpoint request conflicts with the signed log",
                              extra={"sequence": sequence, "last": last.sequence})
                    raise FederationError(
                        ErrorCode.FAILED_PRECONDITION,
                        f"sequence {sequence} is not after the last signed checkpoint "
                        f"({last.sequence})" + (
                            "; its hash differs from the one signed: the chain was rewritten"
                            if existing is not None else ""
                        ),
                    )
            sign_time = self._clock()
            checkpoint = Checkpoint(
                sequence, chain_head_hash, sign_time,
                self._key.sign(signed_message(sequence, chain_head_hash, sign_time)),
                self._fingerprint,
            )
            await asyncio.to_thread(self._append, checkpoint)
            self._add(checkpoint)
            return checkpoint

    def _append(self, checkpoint: Checkpoint) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write_all(fd, (checkpoint.to_json() + "\n").encode(), self._path)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _cut_torn_last_line(self) -> None:
        """Cut the file back to its last whole line: the next checkpoint would otherwise
        be appended to the torn one, making a bad line that is no longer the last, and
        the guardian would refuse its own log at the next start."""
        data = self._path.read_bytes()
        whole = data.rstrip(b"\n").rfind(b"\n") + 1
        fd = os.open(self._path, os.O_WRONLY)
        try:
            os.ftruncate(fd, whole)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _add(self, checkpoint: Checkpoint) -> None:
        if self._checkpoints and checkpoint.sequence <= self._checkpoints[-1].sequence:
            raise ValueError(f"{self._path}: checkpoint {checkpoint.sequence} is not after "
                             f"checkpoint {self._checkpoints[-1].sequence}")
        self._checkpoints.append(checkpoint)

    def _index(self, sequence: int) -> int:
        """Where ``sequence`` is, or would go, in the log."""
        return bisect.bisect_left(self._checkpoints, sequence, key=_sequence)

    def get(self, sequence: int) -> Checkpoint | None:
        """The checkpoint at ``sequence``; 0 = the latest. ``None`` if there is none."""
        if not self._checkpoints:
            return None
        if sequence == 0:
            return self._checkpoints[-1]
        index = self._index(sequence)
        if index < len(self._checkpoints) and self._checkpoints[index].sequence == sequence:
            return self._checkpoints[index]
        return None

    def newest_below(self, below: int | None, limit: int) -> tuple[list[Checkpoint], bool]:
        """Up to ``limit`` checkpoints newest first, of sequences below ``below`` (``None``:
        from the newest); and whether older ones remain (a page and its "more")."""
        end = len(self._checkpoints) if below is None else self._index(below)
        start = max(0, end - limit)
        return self._checkpoints[start:end][::-1], start > 0

    def newest_first(self) -> list[Checkpoint]:
        return list(reversed(self._checkpoints))


def _sequence(checkpoint: Checkpoint) -> int:
    return checkpoint.sequence


# ---- verification of the chain against the checkpoints ---------------------------------------


@dataclass(frozen=True)
class CheckpointReport:
    intact: bool
    checkpoints_checked: int
    last_good_checkpoint: int | None
    """Sequence of the newest checkpoint the chain still matches (None: none matches)."""
    first_bad_sequence: int | None = None
    problem: str = ""


async def verify_against_checkpoints(
    checkpoints: Sequence[Checkpoint],
    hash_at: Callable[[int], Awaitable[bytes | None]],
    keys: GuardianKeys | None,
) -> CheckpointReport:
    """Compare the stored chain with every signed checkpoint, oldest first.

    ``hash_at(sequence)`` returns the stored hash of that record (``None`` if it is
    missing). ``keys``: the guardian's verification keys; when given, every
    checkpoint's signature must verify with the key it names (one that does not is a
    problem).
    A mismatch at checkpoint C means the chain was changed at or before C and after
    the last checkpoint that matches, L: the report names L + 1.
    """
    last_good: int | None = None
    checked = 0
    for checkpoint in sorted(checkpoints, key=lambda c: c.sequence):
        checked += 1
        first_after_good = (last_good or 0) + 1
        if keys is not None and not checkpoint.verify(keys):
            return CheckpointReport(
                False, checked, last_good, first_after_good,
                f"checkpoint {checkpoint.sequence} is not signed by the guardian's key",
            )
        stored = await hash_at(checkpoint.sequence)
        if stored is None:
            return CheckpointReport(
                False, checked, last_good, first_after_good,
                f"record {checkpoint.sequence}, covered by a signed checkpoint, is missing",
            )
        if stored != checkpoint.chain_head_hash:
            since = f"checkpoint {last_good}" if last_good else "the start of the chain"
            return CheckpointReport(
                False, checked, last_good, first_after_good,
                f"record {checkpoint.sequence} does not match the guardian-signed checkpoint: "
                f"the chain was rewritten after {since}; the first record after the last good "
                f"checkpoint is {first_after_good}",
            )
        last_good = checkpoint.sequence
    return CheckpointReport(True, checked, last_good)


# ---- the memory side: when to ask for a checkpoint ---------------------------------------------


class CheckpointScheduler:
    """Asks the guardian for a checkpoint every ``every_records`` or ``every_seconds``.

    The memory node calls :meth:`observe` with the sequence of each committed record
    (or of the last record of a committed batch). ``head()`` returns the current
    ``(sequence, hash)`` (or ``None`` when the chain is empty); ``sign(sequence, hash)``
    calls ``GuardianService.SignCheckpoint``. Failures (guardian down) are logged and
    retried at the next tick: checkpoints never block audit writes.
    """

    def __init__(
        self,
        head: Callable[[], Awaitable[tuple[int, bytes] | None]],
        sign: Callable[[int, bytes], Awaitable[object]],
        *,
        every_records: int,
        every_seconds: float,
    ) -> None:
        self._head = head
        self._sign = sign
        self._every_records = max(1, every_records)
        self._every_seconds = every_seconds
        self._last_signed = 0
        self._observed = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    def observe(self, sequence: int) -> None:
        self._observed = max(self._observed, sequence)
        if self._observed - self._last_signed >= self._every_records:
            self._wakeup.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="checkpoint-scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def checkpoint_now(self) -> int | None:
        """Sign the current head if it moved; returns the signed sequence."""
        head = await self._head()
        if head is None or head[0] <= self._last_signed:
            return None
        await self._sign(head[0], head[1])
        self._last_signed = head[0]
        return head[0]

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._every_seconds)
            self._wakeup.clear()
            try:
                await self.checkpoint_now()
            except Exception as exc:  # the guardian may be down: try again next tick
                self.failures += 1
                log.warning("audit checkpoint failed", extra={"error": str(exc)[:200]})
