"""Request bodies: read once, under the body deadline, and parsed once as JSON; and
:func:`json_response`, the JSON of an answer.

:func:`body_middleware` runs before authentication and before the council and
transcript middlewares. For a request with a body (POST, PUT, PATCH, DELETE) to a
route that exists, it reads the body (at most ``gateway.max_body_bytes``: 413 beyond;
``gateway.body_read_timeout_seconds``: 408 and the connection closed beyond) and parses
it as JSON. Handlers take the parsed value from :func:`json_body`; nothing parses a
body a second time.

The parser refuses with 400 (INVALID_ARGUMENT, naming the parameter where there is
one) what would otherwise fail later, deep in a handler, as a 500:

* nesting deeper than ``gateway.max_json_depth`` (checked on the raw bytes before the
  decoder recurses, so 100,000 levels cost a linear scan, never a RecursionError);
* an integer outside the signed 64-bit range, the widest integer of any field behind
  the gateway (protobuf ``int64``; PostgreSQL ``bigint``), and a number that is not
  finite (``1e999``, ``NaN``, ``Infinity``);
* a string holding an unpaired UTF-16 surrogate (``"\\ud800"``), which no UTF-8 encoder
  (protobuf, PostgreSQL, the tokenizer) accepts;
* bytes that are not UTF-8 and text that is not JSON.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from federation.config import GatewayConfig
from federation.errors import ErrorCode, FederationError
from gateway_http.server import BodyReadTimeout

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
_INT64_DIGITS: Final = 19

_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN_TWO_CLOSE_ZERO: Final = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Parsed:
    value: Any


_JSON_BODY: Final = web.RequestKey("json_body", _Parsed)


def body_middleware(config: GatewayConfig) -> Middleware:
    """Reads and parses the body of every request that has one, before any handler."""
    max_depth = config.max_json_depth

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method in _BODY_METHODS and request.body_exists
                and request.match_info.http_exception is None):
            request[_JSON_BODY] = _Parsed(parse_json(await read_body(request), max_depth))
        return await handler(request)

    return middleware


def has_json_body(request: web.Request) -> bool:
    return _JSON_BODY in request


def json_body(request: web.Request) -> Any:
    """The request's parsed JSON body; ``None`` when it came without one."""
    parsed = request.get(_JSON_BODY)
    return parsed.value if parsed is not None else None


async def read_body(request: web.Request) -> bytes:
    """The whole body (aiohttp keeps it: reading again costs nothing)."""
    try:
        return await request.read()
    except BodyReadTimeout:
        raise web.HTTPRequestTimeout() from None
    except RequestPayloadError as exc:
        raise _invalid(None, f"The request body could not be read: {exc}") from None


# ---- the parser ------------------------------------------------------------------------

class _BadNumber:
    """Stands for a number the parser refused, until its place is known."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Refused(Exception):
    def __init__(self, error: FederationError) -> None:
        super().__init__(error.message)
        self.error = error


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` as JSON, or FederationError INVALID_ARGUMENT (see the module docstring)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(None, "The request body is not UTF-8 text.") from None
    check_depth(raw, max_depth)
    bad: list[_BadNumber] = []

    def parse_int(digits: str) -> int | _BadNumber:
        if len(digits.lstrip("-")) <= _INT64_DIGITS:
            number = int(digits)
            if INT64_MIN <= number <= INT64_MAX:
                return number
        bad.append(_BadNumber("integers must be within the signed 64-bit range "
                              f"[{INT64_MIN}, {INT64_MAX}]"))
        return bad[-1]

    def parse_float(digits: str) -> float | _BadNumber:
        number = float(digits)
        if math.isfinite(number):
            return number
        bad.append(_BadNumber("numbers must be finite"))
        return bad[-1]

    def parse_constant(name: str) -> Any:
        raise _Refused(_invalid(None, f"{name} is not a JSON value: numbers must be finite."))

    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float,
                           parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise _invalid(None, f"We could not parse the JSON body of your request: {exc}"
                       ) from None
    except _Refused as refused:
        raise refused.error from None
    if bad:
        raise _invalid_at(_path_of(value, lambda v: isinstance(v, _BadNumber)), bad[0].reason)
    if _SURROGATE_ESCAPE.search(raw):
        param = _path_of(value, _has_lone_surrogate, keys=True)
        if param is not None:
            raise _invalid_at(param, "strings must not hold an unpaired UTF-16 surrogate "
                                     "(a \\ud800-\\udfff escape without its pair)")
    return value


def check_depth(raw: bytes, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth``, on the raw bytes, before the decoder
    recurses: strings removed, brackets kept, then the deepest running count of open
    brackets (C-level iteration: about 50 ms for a 1 MiB body of brackets alone)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= max_depth:
        return  # the common case: too few brackets to nest that deep
    steps = brackets.translate(_OPEN_TWO_CLOSE_ZERO)  # each byte adds 1 or -1 once offset
    depth = max(map(operator.sub, accumulate(steps), range(1, len(steps) + 1)))
    if depth > max_depth:
        raise _invalid(None, f"The JSON body is nested more than {max_depth} levels deep.")


def _has_lone_surrogate(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path_of(value: Any, wanted: Callable[[Any], bool], *, keys: bool = False
             ) -> str | None:
    """The parameter name (``messages[0].content``) of the first value in ``value`` that
    is ``wanted`` (with ``keys``: or whose key is); ``""`` for ``value`` itself, ``None``
    when there is none."""
    if wanted(value):
        return ""
    for path, item, key in _entries(value, ""):
        if wanted(item) or (keys and wanted(key)):
            return path
    return None


def _entries(value: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(parameter name, value, its key) of everything inside ``value``, depth first."""
    if isinstance(value, dict):
        pairs: Iterator[tuple[str, Any, Any]] = (
            (f"{path}.{_name(k)}" if path else _name(k), v, k) for k, v in value.items())
    elif isinstance(value, list):
        pairs = ((f"{path}[{i}]", v, None) for i, v in enumerate(value))
    else:
        return
    for child, item, key in pairs:
        yield child, item, key
        yield from _entries(item, child)


def _name(key: str) -> str:
    """A key as it can be shown (an unpaired surrogate escaped)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _invalid_at(param: str | None, reason: str) -> FederationError:
    if not param:
        return _invalid(None, f"Invalid JSON body: {reason}.")
    return _invalid(param, f"Invalid value for '{param}': {reason}.")


def _invalid(param: str | None, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def json_response(value: Any, status: int = 200) -> web.Response:
    """``value`` as a JSON response: compact, UTF-8 as is. orjson, not ``json``: an answer
    is encoded on every request's path (a chat completion's ~30 us with ``json`` and
    ``web.json_response`` at concurrency 1, ~6 us this way; issue 18). A float that is
    not finite becomes ``null``, never the invalid ``NaN``."""
    return web.Response(body=orjson.dumps(value), status=status,
                        content_type="application/json", charset="utf-8")
