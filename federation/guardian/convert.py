"""Guardian shares and checkpoints -> protobuf, for the GuardianService servicer."""

from __future__ import annotations

from federation.guardian.checkpoints import Checkpoint
from federation.guardian.custody import ShareInfo
from federation.prototime import timestamp
from federation.v1 import guardian_pb2


def share_record(info: ShareInfo) -> guardian_pb2.ShareRecord:
    record = guardian_pb2.ShareRecord(
        tenant_id=info.tenant_id, object_id=info.object_id, key_id=info.key_id,
        share_index=info.share_index,
        state=guardian_pb2.SHARE_STATE_HELD if info.held else guardian_pb2.SHARE_STATE_DESTROYED,
        deposit_time=timestamp(info.deposit_time), release_count=info.release_count,
    )
    if info.destroy_time is not None:
        record.destroy_time.CopyFrom(timestamp(info.destroy_time))
    if info.last_release_time is not None:
        record.last_release_time.CopyFrom(timestamp(info.last_release_time))
    return record


def checkpoint_message(checkpoint: Checkpoint) -> guardian_pb2.Checkpoint:
    return guardian_pb2.Checkpoint(
        sequence=checkpoint.sequence, chain_head_hash=checkpoint.chain_head_hash,
        sign_time=timestamp(checkpoint.sign_time), signature=checkpoint.signature,
        key_fingerprint=checkpoint.key_fingerprint,
    )


