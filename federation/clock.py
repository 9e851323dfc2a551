"""Wall-clock time, in one place, so components take it as a parameter and tests can
pass a fixed or advancing clock instead."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

Clock = Callable[[], dt.datetime]
"""Returns the current time, timezone-aware, in UTC."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
