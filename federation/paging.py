"""Page sizes of list RPCs (AIP-158): 0 means the default, the maximum is a cap."""

from __future__ import annotations

from typing import Final

from federation.errors import ErrorCode, FederationError

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The number of items to return for a requested ``page_size``."""
    if requested < 0:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "page_size must not be negative",
                              param="page_size")
    return min(requested or default, MAX_PAGE_SIZE)


MAX_SEQUENCE: Final = 2**63 - 1
"""The largest value a ``bigint`` column (a sequence, a row id) holds."""


def invalid_page_token() -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, "page_token is not valid",
                           param="page_token")


def sequence_token(token: str) -> int:
    """The row sequence a page token of decimal digits names. ``str.isdigit`` alone
    lets through digits ``int`` refuses ("²") and numbers past a ``bigint`` or past
    ``int``'s 4300-digit limit, which failed the call as INTERNAL."""
    if not (token.isascii() and token.isdigit() and len(token) <= len(str(MAX_SEQUENCE))):
        raise invalid_page_token()
    value = int(token)
    if value > MAX_SEQUENCE:
        raise invalid_page_token()
    return value
