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
