"""Argument types of the CLI: a value is checked where it is typed, so a bad one is
argparse's one line naming the flag, never a traceback from deeper down (a protobuf
field out of range, a date past the year 9999)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable
from typing import Final

from federation.prototime import MAX_DURATION_SECONDS

INT32_MAX: Final = 2**31 - 1
INT64_MAX: Final = 2**63 - 1

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def integer(minimum: int, maximum: int) -> Callable[[str], int]:
    """A whole number from ``minimum`` to ``maximum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is not between {minimum} and {maximum}")
        return value
    return parse


def seconds(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h`` or ``2d``, as seconds; at most a century."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 15m, 1h, 2d)")
    value = float(match[1]) * _UNITS[match[2] or "s"]
    if value > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is longer than {MAX_DURATION_SECONDS // 86400} days")
    return value


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address, as typed (a certificate's SAN)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None
    return text


port = integer(0, 65535)
"""A TCP port; 0 picks a free one. (gRPC and the OS would silently take 70000 as 4464.)"""


def listen_address(text: str) -> str:
    """``HOST:PORT`` to serve on (``[::1]:PORT`` for IPv6), the port checked as :data:`port`."""
    host, colon, number = text.rpartition(":")
    if not colon or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    port(number)
    return text


def days(text: str) -> float:
    """A number of days, 0 to a century (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not (math.isfinite(value) and 0 <= value <= MAX_DURATION_SECONDS / 86400):
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and "
                                         f"{MAX_DURATION_SECONDS // 86400} days")
    return value
