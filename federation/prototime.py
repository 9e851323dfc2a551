"""Protobuf ``Timestamp`` and ``Duration`` <-> Python, in one place.

On the Python side a timestamp is a timezone-aware UTC ``datetime`` and a
duration is float seconds; on the wire both keep nanosecond precision.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from federation.errors import ErrorCode, FederationError

MAX_DURATION_SECONDS: Final = 100 * 365 * 86400
"""The longest duration the federation takes anywhere (a ttl, a period, a flag): a
century. Past it, a date overflows, and the value was a typo anyway."""


def timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def to_datetime(stamp: Timestamp) -> dt.datetime:
    """The moment, timezone-aware in UTC (what every ``Timestamp`` means)."""
    return stamp.ToDatetime(tzinfo=dt.UTC)


_MIN_SECONDS: Final = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z


def checked_datetime(stamp: Timestamp, param: str) -> dt.datetime:
    """:func:`to_datetime` of a caller's timestamp: one outside the range a ``Timestamp``
    may hold (years 1 to 9999, nanos 0 to 999,999,999) makes ``ToDatetime`` raise, which
    is the caller's mistake (INVALID_ARGUMENT naming ``param``), not the server's."""
    if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 10**9):
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{param} must be a time from year 1 to 9999", param=param)
    return to_datetime(stamp)


def duration(seconds: float) -> Duration:
    value = Duration()
    # Rounded, not truncated: 0.7 days is 60479.999999999993 s as a float, and a
    # truncated 60479 s + 999999999 ns is not the whole-second period it was typed as.
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def to_seconds(value: Duration) -> float:
    return float(value.ToNanoseconds()) / 1e9


_MAX_DURATION_WIRE_SECONDS: Final = 315_576_000_000  # what a Duration may hold: 10,000 years


def checked_seconds(value: Duration, param: str) -> float:
    """:func:`to_seconds` of a caller's duration that must be well formed: seconds and
    nanos of one sign, nanos under a second, within a ``Duration``'s range (otherwise
    INVALID_ARGUMENT naming ``param``)."""
    seconds, nanos = value.seconds, value.nanos
    if not (abs(seconds) <= _MAX_DURATION_WIRE_SECONDS and abs(nanos) < 10**9
            and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))):
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{param} is not a well-formed duration", param=param)
    return to_seconds(value)
