"""OpenAI-style error responses, built from the one error catalog.

``error_middleware`` is the outermost guard: whatever a handler raises (a
:class:`FederationError`, an aiohttp HTTP exception such as 404/405/413, or
a bug) becomes ``{"error": {"message", "type", "param", "code"}}`` with the
catalog's status. Unknown exceptions are logged with the request id and
answered with a fixed message, so no response ever carries a traceback.

What never reaches a handler is answered in the same shape from here too: the
HTTP parser's refusals (:func:`parser_refusal`, used by ``gateway_http/server.py``)
and the connection-level answers written straight to a socket
(:func:`raw_error_response`: 408 for a request head that did not arrive in time,
503 beyond the connection limit).
"""

from __future__ import annotations

import json
import logging
import math
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from federation.db.errors import outage_error
from federation.errors import (
    CATALOG,
    INTERNAL_MESSAGE,
    TRANSPORT_RETRY_AFTER_SECONDS,
    ErrorCode,
    FederationError,
)
from federation.logs import REQUEST_ID_HEADER, new_request_id

log = logging.getLogger(__name__)

ERROR_KEY = web.RequestKey("federation_error", FederationError)
"""The error a request was answered with, for the metrics and audit that run after."""

_HTTP_TO_CODE: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_ARGUMENT,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID_ARGUMENT,
    408: ErrorCode.DEADLINE_EXCEEDED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.INVALID_ARGUMENT,
    429: ErrorCode.RESOURCE_EXHAUSTED,
}

EDGE_STATUSES: tuple[int, ...] = (400, 408, 503)
"""Statuses any request can meet before its handler runs: the HTTP parser's refusals
(400), the head or body read deadline (408), the connection limit (503). Every
operation in ``/openapi.json`` documents them."""

AUTH_STATUSES: tuple[int, ...] = (401, 403, 503, 504)
"""Statuses of an API key's verification by the key authority: unknown, expired or
revoked (401), missing scope or suspended (403), the authority unavailable (503) or
too slow (504)."""

BODY_STATUSES: tuple[int, ...] = (400, 408, 413)
"""Statuses of reading a request body: not JSON, too deep, a number out of range
(400), not in time (408), larger than ``gateway.max_body_bytes`` (413)."""

_KEPT_STATUSES = frozenset({405, 408, 415})
"""HTTP statuses answered as they are, though their catalog code maps to another
(405/415 are INVALID_ARGUMENT, 408 is DEADLINE_EXCEEDED, which the catalog makes 504)."""

_HEADER_NAME = re.compile(r"^\s*b?['\"]([!#$%&'*+.^_`|~0-9A-Za-z-]+):", re.MULTILINE)


def error_body(error: FederationError) -> dict[str, Any]:
    """The OpenAI error object; ``code`` is our catalog code (a stable string)."""
    return {
        "error": {
            "message": error.message,
            "type": error.spec.openai_type,
            "param": error.param,
            "code": error.code.value,
        }
    }


def error_response(error: FederationError, status: int | None = None) -> web.Response:
    """The JSON error response; ``status`` overrides the catalog's (405, 408, 415)."""
    return web.json_response(
        error_body(error), status=status or CATALOG[error.code].http_status,
        headers=_retry_after(error), dumps=_dumps,
    )


def raw_error_response(error: FederationError, status: int) -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 error response as bytes, for answers the
    gateway writes on a connection before (or instead of) parsing a request."""
    body = _dumps(error_body(error)).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close",
            f"{REQUEST_ID_HEADER}: {new_request_id()}",
            *(f"{name}: {value}" for name, value in _retry_after(error).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def protocol_error(status: int, exc: BaseException | None, message: str | None
                   ) -> FederationError:
    """What aiohttp answers without running the app: the parser's refusals (400), or
    a failure of the middleware chain itself (500, 504 on a timeout)."""
    if isinstance(exc, HttpProcessingError):
        return parser_refusal(exc, message)
    if status == 504:
        return FederationError(ErrorCode.DEADLINE_EXCEEDED, "The request timed out.")
    return FederationError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)


def parser_refusal(exc: BaseException | None, message: str | None) -> FederationError:
    """aiohttp's HTTP parser refused the request (a header too long, a bad
    Content-Length, a NUL in a header...): INVALID_ARGUMENT naming the header when the
    parser showed it. Only the parser's reason is kept, never the bytes it echoes."""
    text = getattr(exc, "message", None) or message or str(exc or "")
    lines = text.strip().splitlines()
    reason = lines[0].split(":", 1)[0].strip()[:100] if lines else ""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the allowed number of"
        return FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"The request line or a request header is longer than {limit} bytes.",
        )
    found = _HEADER_NAME.search(text)
    param = found.group(1) if found else None
    detail = f" (header {param!r})" if param else ""
    return FederationError(
        ErrorCode.INVALID_ARGUMENT,
        f"The HTTP request is malformed: {reason or 'bad request'}{detail}.", param=param,
    )


def sse_error(error: FederationError) -> bytes:
    """The error event sent once a stream has started (the 200 is already on the wire)."""
    return b"data: " + _dumps(error_body(error)).encode() + b"\n\n"


def from_http_exception(exc: web.HTTPException) -> FederationError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        # aiohttp's text names the limit and the size, and nothing else.
        return FederationError(ErrorCode.PAYLOAD_TOO_LARGE, exc.text or "request body too large")
    code = _HTTP_TO_CODE.get(exc.status, ErrorCode.INTERNAL)
    if exc.status == 404:
        return FederationError(code, "no such endpoint")
    if exc.status == 405:
        return FederationError(code, "method not allowed on this endpoint")
    if exc.status == 408:
        return FederationError(code, "The request body did not arrive within the gateway's "
                                     "body read timeout; the connection is closed.")
    return FederationError(code, exc.reason if code is not ErrorCode.INTERNAL else INTERNAL_MESSAGE)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except FederationError as exc:
        request[ERROR_KEY] = exc
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        request[ERROR_KEY] = error = from_http_exception(exc)
        answer = error_response(error, exc.status if exc.status in _KEPT_STATUSES else None)
        if exc.status == 408:
            answer.force_close()  # the rest of the request is not coming in time
        if "Allow" in exc.headers:  # a 405 names the methods that are (RFC 9110)
            answer.headers["Allow"] = exc.headers["Allow"]
        return answer
    except Exception as exc:
        outage = outage_error(exc)  # the vault's own database: 503, not 500
        if outage is None:
            log.exception("unhandled error", extra={"path": request.path})
        request[ERROR_KEY] = error = outage or FederationError(ErrorCode.INTERNAL,
                                                                INTERNAL_MESSAGE)
        return error_response(error)


def _retry_after(error: FederationError) -> dict[str, str]:
    seconds = error.retry_after_seconds
    if seconds is None and error.code is ErrorCode.UNAVAILABLE:
        # Every 503 says when to retry, also when the failure came without an estimate
        # (a node's connection reset, a stream that timed out): the transport's default.
        seconds = TRANSPORT_RETRY_AFTER_SECONDS
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
