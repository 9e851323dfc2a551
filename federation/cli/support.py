"""What the CLI's command groups share: output and failure. How an operator reaches
the running federation (endpoints, database, admin channel) is in
:mod:`federation.launch.endpoints`, which the backup package uses too."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from federation.config import Settings

T = TypeVar("T")

def fail(message: str, code: int = 1) -> NoReturn:
    print(f"federation: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def print_json_line(value: Any) -> None:
    """One JSON object per line (JSON Lines), for output that arrives as it happens."""
    print(json.dumps(value, sort_keys=True, default=str), flush=True)


def proto_json(message: Message) -> dict[str, Any]:
    """A message for ``--json``: field names as in the proto, and every field without
    presence printed even when zero (a script reads ``tokens_used: 0``, not a missing
    key); an unset ``optional`` field stays absent (unset means none, e.g. no limit)."""
    return MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


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
