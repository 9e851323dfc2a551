"""Request values checked against what the broker's tables can hold.

Protobuf carries ``uint32``/``uint64``, strings with NUL characters and timestamps
outside the years 1-9999; PostgreSQL's
``integer``/``bigint``/``smallint`` columns and ``text`` cannot take all of them, and
its refusal would reach the caller as INTERNAL. Checked here, first, a bad field is
INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from federation.errors import ErrorCode, FederationError
from federation.prototime import to_datetime

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


def checked_text(value: str, param: str) -> str:
    """``value`` unless it holds a NUL character, which PostgreSQL text cannot store."""
    if "\x00" in value:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, f"{param} must not contain NUL characters", param=param
        )
    return value


def checked_texts(values: Iterable[str], param: str) -> tuple[str, ...]:
    return tuple(checked_text(value, param) for value in values)


def checked_datetime(stamp: Timestamp, param: str) -> dt.datetime:
    """The moment of ``stamp``; INVALID_ARGUMENT on ``param`` when it is not a valid
    ``Timestamp`` (years 1-9999, nanos within a second), which Python cannot represent."""
    try:
        return to_datetime(stamp)
    except (ValueError, OverflowError) as exc:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{param}: {exc}", param=param) from None
