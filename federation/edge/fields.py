"""Request integers checked against what the broker's tables can hold.

Protobuf carries ``uint32``/``uint64``; PostgreSQL's ``integer``/``bigint``/``smallint``
columns cannot take all of them, and its refusal would reach the caller as INTERNAL.
Checked here, first, a bad field is INVALID_ARGUMENT naming it. (Text with a NUL and
timestamps outside the years 1-9999 are the shared checks' business:
``federation.fields.storable`` and ``federation.prototime.checked_datetime``.)
"""

from __future__ import annotations

from typing import Final

from federation.errors import ErrorCode, FederationError

INT16_MAX: Final = 2**15 - 1
"""Largest ``smallint``."""
INT32_MAX: Final = 2**31 - 1
"""Largest ``integer``."""
INT64_MAX: Final = 2**63 - 1
"""Largest ``bigint``."""


def checked_int(value: int, param: str, maximum: int) -> int:
    """``value`` when it is within 0..``maximum``; INVALID_ARGUMENT on ``param`` otherwise."""
    if not 0 <= value <= maximum:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"{param} must be between 0 and {maximum}; got {value}",
            param=param,
        )
    return value
