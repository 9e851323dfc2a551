"""The memory node's side of audit checkpoints: ask the guardian to sign, verify against it.

Kept out of the servicer (``nodes/memory.py`` only wires and converts):

* :class:`GuardianCheckpoints` talks to ``GuardianService`` over the memory node's
  mTLS channel: ``SignCheckpoint`` for the :class:`CheckpointScheduler`,
  ``ListCheckpoints`` (every page) for verification.
* :func:`verify_with_checkpoints` runs the hash-chain walk and the checkpoint
  comparison and merges them into one report: the smaller ``first_bad_sequence``
  wins, both problems are named.

Which keys verify the signatures: the guardian's public key file
(``$FEDERATION_HOME/guardian/checkpoint_signing.key.pub``, written by the guardian
at start: its current key, then any it signed with before). The proto carries only
the key's fingerprint, not the key, so on a deployment where the memory node does
not share the guardian's home, copy that ``.pub`` file there. Without it the
checkpoints are still trusted as far as the mTLS channel makes them (they come from
the guardian's SPIFFE identity), and the report says that signatures were not
checked.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.guardian.checkpoints import (
    Checkpoint,
    CheckpointReport,
    GuardianKeys,
    load_public_keys,
    public_key_path,
    verify_against_checkpoints,
)
from federation.memory.restore_event import RestoreClaim
from federation.memory.store import MemoryStore
from federation.prototime import to_datetime
from federation.v1 import guardian_pb2, guardian_pb2_grpc

log = logging.getLogger(__name__)

_PAGE: Final = 1000


def checkpoint_from_proto(message: guardian_pb2.Checkpoint) -> Checkpoint:
    return Checkpoint(
        sequence=message.sequence,
        chain_head_hash=bytes(message.chain_head_hash),
        sign_time=to_datetime(message.sign_time),
        signature=bytes(message.signature),
        key_fingerprint=message.key_fingerprint,
    )


def guardian_keys(signing_key_path: Path) -> GuardianKeys | None:
    """The guardian's checkpoint verification keys next to its signing key, if present."""
    path = public_key_path(signing_key_path)
    if not path.exists():
        log.warning("guardian public key not found; checkpoint signatures are not checked",
                    extra={"path": str(path)})
        return None
    return load_public_keys(path)


class GuardianCheckpoints:
    """``GuardianService`` checkpoint calls on a channel carrying the memory identity."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = guardian_pb2_grpc.GuardianServiceStub(channel)
        self._timeout = timeout

    async def sign(self, sequence: int, chain_head_hash: bytes) -> Checkpoint:
        try:
            response = await self._stub.SignCheckpoint(
                guardian_pb2.SignCheckpointRequest(
                    sequence=sequence, chain_head_hash=chain_head_hash),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return checkpoint_from_proto(response.checkpoint)

    async def list_all(self) -> list[Checkpoint]:
        """Every signed checkpoint; UNAVAILABLE (clear message) when the guardian is down."""
        checkpoints: list[Checkpoint] = []
        token = ""
        while True:
            try:
                page = await self._stub.ListCheckpoints(
                    guardian_pb2.ListCheckpointsRequest(page_size=_PAGE, page_token=token),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                if error.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED):
                    raise FederationError(
                        ErrorCode.UNAVAILABLE,
                        "the guardian is unavailable: the chain cannot be checked against its "
                        "signed checkpoints; try again when it is back",
                        retry_after_seconds=5.0,
                    ) from None
                raise error from None
            checkpoints += [checkpoint_from_proto(c) for c in page.checkpoints]
            token = page.next_page_token
            if not token:
                return checkpoints


@dataclass(frozen=True)
class VerifyReport:
    """The chain walk and the checkpoint comparison, merged."""

    intact: bool
    records_checked: int
    first_bad_sequence: int | None
    problem: str
    last_checkpoint_sequence: int | None
    """The newest guardian-signed checkpoint in the range (``None``: none)."""
    checkpoints: CheckpointReport | None
    """``None`` when no guardian is configured (chain-only verification)."""
    restores: tuple[RestoreClaim, ...] = ()
    """Restore events in the range, oldest first: what each restore lost."""
    signatures_checked: bool = False
    """The checkpoints compared were checked with the guardian's keys (``False`` when
    there were none, or no keys to check them with)."""


async def verify_with_checkpoints(
    store: MemoryStore,
    checkpoints: list[Checkpoint] | None,
    keys: GuardianKeys | None,
    from_sequence: int = 0,
    to_sequence: int = 0,
) -> VerifyReport:
    """Walk the chain in the range and compare it with the checkpoints in the range.

    With ``to_sequence == 0`` (up to the head) every checkpoint from ``from_sequence``
    on counts, including those beyond the current head: records deleted from the end
    of the chain then show up as missing.
    """
    chain = await store.verify_chain(from_sequence, to_sequence)
    if checkpoints is None:
        return VerifyReport(chain.intact, chain.records_checked, chain.first_bad_sequence,
                            chain.problem, None, None, chain.restores)
    first = max(from_sequence, 1)
    in_range = [c for c in checkpoints
                if c.sequence >= first and (to_sequence == 0 or c.sequence <= to_sequence)]
    hash_at: Callable[[int], Awaitable[bytes | None]] = store.hash_at
    # Checkpoints of records a verified restore event declares lost are the evidence of
    # that loss (the event reports it), not of a rewrite: they are not compared.
    compared = [c for c in in_range if not _declared_lost(c.sequence, chain.restores)]
    report = await verify_against_checkpoints(compared, hash_at, keys)
    last = max((c.sequence for c in compared), default=None)
    bad = [s for s in (chain.first_bad_sequence, report.first_bad_sequence) if s is not None]
    problems = [p for p in (chain.problem, report.problem) if p]
    if keys is None and in_range:
        problems.append("checkpoint signatures were not checked (no guardian public key)")
    return VerifyReport(
        intact=chain.intact and report.intact,
        records_checked=chain.records_checked,
        first_bad_sequence=min(bad) if bad else None,
        problem="; ".join(problems) if not (chain.intact and report.intact) else "",
        last_checkpoint_sequence=last,
        checkpoints=report,
        restores=chain.restores,
        signatures_checked=keys is not None and bool(compared),
    )


def _declared_lost(sequence: int, restores: tuple[RestoreClaim, ...]) -> bool:
    return any(r.lost_from <= sequence <= r.lost_to for r in restores)
