"""Protobuf ``Timestamp`` and ``Duration`` <-> Python, in one place.

On the Python side a timestamp is a timezone-aware UTC ``datetime`` and a
duration is float seconds; on the wire both keep nanosecond precision.
"""

from __future__ import annotations

import datetime as dt
from typing import Final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

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


def duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def to_seconds(value: Duration) -> float:
    return float(value.ToNanoseconds()) / 1e9
