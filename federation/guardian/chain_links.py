"""The guardian's check of a checkpoint request against the chain itself.

Without it the guardian signed any sequence the memory node or an operator named, up
to 2**63 - 1, with any 32 bytes. Its log is append-only and refuses every later request
at or below its newest checkpoint, so one checkpoint beyond the chain's head stopped
all checkpoints until the chain grew that far, and every verification reported the
record it names as missing (a wrong hash: as altered). So before signing, the guardian
asks the memory node (``ThermalMemoryService.GetChainLink``) for the chain's head and
the stored hash at the sequence, and refuses a sequence beyond the head, one with no
record, or a hash that is not the record's.

This puts no trust in the database: the check can only refuse. A rewritten database
agrees with the memory node's request anyway (both read the same rows), so the
checkpoint log's own evidence of a rewrite (a new hash at a signed sequence) is
unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import grpc

from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainLink:
    head_sequence: int
    """The chain's newest record (0: the chain is empty)."""
    hash: bytes | None
    """The stored hash at the sequence asked for (``None``: no record there)."""


class ChainLinks(Protocol):
    async def link(self, sequence: int) -> ChainLink:
        """The chain's head and the hash of record ``sequence``."""


class MemoryChainLinks:
    """:class:`ChainLinks` from the memory node, on a channel with the guardian's identity."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float) -> None:
        self._stub = pb_grpc.ThermalMemoryServiceStub(channel)
        self._timeout = timeout

    async def link(self, sequence: int) -> ChainLink:
        try:
            response = await self._stub.GetChainLink(
                pb.GetChainLinkRequest(sequence=sequence), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            # Whatever the memory node answered, the caller's request is not at fault.
            error = from_rpc_error(exc)
            log.warning("the chain could not be read for a checkpoint",
                        extra={"sequence": sequence, "error": error.message[:200]})
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                f"the memory node could not be asked for record {sequence} of the chain, "
                "so no checkpoint was signed; try again", retry_after_seconds=5.0,
            ) from None
        return ChainLink(response.head_sequence, bytes(response.hash) or None)


def check_link(sequence: int, chain_head_hash: bytes, link: ChainLink) -> None:
    """Refuse a checkpoint of ``sequence`` and ``chain_head_hash`` that the chain, as
    ``link`` shows it, does not hold."""
    head = link.head_sequence
    if sequence > head:
        raise FederationError(
            ErrorCode.OUT_OF_RANGE,
            f"sequence {sequence} is beyond the chain's head (record {head}): there is no "
            "record to sign", param="sequence")
    if link.hash is None:
        raise FederationError(
            ErrorCode.FAILED_PRECONDITION,
            f"record {sequence} is not in the chain (lost in a restore); the chain's head "
            f"is record {head}", param="sequence")
    if link.hash != chain_head_hash:
        raise FederationError(
            ErrorCode.FAILED_PRECONDITION,
            f"chain_head_hash is not the hash of record {sequence} (the chain's head is "
            f"record {head})", param="chain_head_hash")
