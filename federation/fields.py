"""Checks of request text that PostgreSQL would otherwise refuse mid-statement.

PostgreSQL's ``text`` and ``jsonb`` cannot hold U+0000. A NUL that reaches a
statement fails it with a driver error the caller sees as INTERNAL (and, in a
group commit, fails every record sharing the commit); checked here it is
INVALID_ARGUMENT naming the field, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from federation.errors import ErrorCode, FederationError


def storable(value: str, param: str) -> str:
    """``value`` when PostgreSQL can store it; INVALID_ARGUMENT naming ``param`` if not."""
    if "\x00" in value:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{param} must not contain NUL characters", param=param)
    return value


def bounded(value: str, param: str, max_chars: int) -> str:
    """``value`` when storable and at most ``max_chars`` characters long; INVALID_ARGUMENT
    naming ``param`` if not. For a field that a btree index holds: PostgreSQL refuses an
    index row past 2704 bytes, mid-statement, as it refuses a NUL."""
    storable(value, param)
    if len(value) > max_chars:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"{param} is longer than {max_chars} characters", param=param)
    return value


def storable_all(values: Iterable[str], param: str) -> tuple[str, ...]:
    """Each of ``values`` storable (a repeated field, all named ``param``)."""
    return tuple(storable(value, param) for value in values)


def storable_map(values: Mapping[str, str], param: str) -> None:
    """Each key and value of ``values`` storable (as text or in ``jsonb``)."""
    for key, value in values.items():
        storable(key, f"{param} key")
        storable(value, f"{param}[{key!r}]")
