"""What ``federation audit verify`` and ``federation restore`` say about a restore event."""

from __future__ import annotations

from federation.v1 import thermal_memory_pb2 as pb


def describe_restore(restore: pb.ChainRestore) -> str:
    """One line naming the restore, its backup and exactly what it lost."""
    when = restore.restore_time.ToJsonString() if restore.HasField("restore_time") else "?"
    head = (f"restore event at record {restore.sequence} ({when}, by {restore.restored_by}): "
            f"backup {restore.backup_id} (taken {restore.backup_time}) ends at record "
            f"{restore.backup_sequence}; ")
    if restore.lost_count > 0:
        lost = (f"records {restore.lost_from}-{restore.lost_to} are lost ({restore.lost_count} "
                f"records, per the guardian's checkpoint at record {restore.lost_to})")
    else:
        lost = "no guardian checkpoint covered any record after it"
    return head + lost + "; records written after the last checkpoint were never signed"
