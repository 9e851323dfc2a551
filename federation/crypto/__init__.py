"""Threshold envelope encryption: 2-of-3 key shares, AES-256-GCM envelopes, key wrapping.

Plain domain code: no gRPC, no database. See :mod:`federation.crypto.shares` for
the secret-sharing scheme and :mod:`federation.crypto.envelope` for encryption.
"""

from federation.crypto.envelope import (
    CiphertextInvalid,
    SealedObject,
    UnwrapError,
    key_check_value,
    new_data_key,
    open_sealed,
    open_with_shares,
    seal,
    unwrap,
    wrap,
)
from federation.crypto.shares import (
    InvalidShare,
    MalformedShare,
    Share,
    combine_shares,
    new_key_id,
    split_key,
)

__all__ = [
    "CiphertextInvalid",
    "InvalidShare",
    "MalformedShare",
    "SealedObject",
    "Share",
    "UnwrapError",
    "combine_shares",
    "key_check_value",
    "new_data_key",
    "new_key_id",
    "open_sealed",
    "open_with_shares",
    "seal",
    "split_key",
    "unwrap",
    "wrap",
]
