"""What the CLI's command groups share: output and failure. How an operator reaches
the running federation (endpoints, database, admin channel) is in
:mod:`federation.launch.endpoints`, which the backup package uses too."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from federation.config import Settings

T = TypeVar("T")

def fail(message: str, code: int = 1) -> NoReturn:
    print(f"federation: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


async def all_pages(fetch: Callable[[str], Awaitable[tuple[Sequence[T], str]]]) -> list[T]:
    """Every item of a paged listing; ``fetch(page_token)`` returns (items, next token)."""
    items: list[T] = []
    token = ""
    while True:
        page, token = await fetch(token)
        items += page
        if not token:
            return items


def home_path(settings: Settings) -> Path:
    return settings.home.resolve()
