"""OpenAI-style error responses, built from the one error catalog.

``error_middleware`` is the outermost guard: whatever a handler raises (a
:class:`FederationError`, an aiohttp HTTP exception such as 404/405/413, or
a bug) becomes ``{"error": {"message", "type", "param", "code"}}`` with the
catalog's status. Unknown exceptions are logged with the request id and
answered with a fixed message, so no response ever carries a traceback.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web

from federation.db.errors import outage_error
from federation.errors import CATALOG, INTERNAL_MESSAGE, ErrorCode, FederationError

log = logging.getLogger(__name__)

ERROR_KEY = web.RequestKey("federation_error", FederationError)
"""The error a request was answered with, for the metrics and audit that run after."""

_HTTP_TO_CODE: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_ARGUMENT,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID_ARGUMENT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.INVALID_ARGUMENT,
    429: ErrorCode.RESOURCE_EXHAUSTED,
}


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


def error_response(error: FederationError) -> web.Response:
    headers = {}
    if error.retry_after_seconds is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_seconds)))
    return web.json_response(
        error_body(error), status=CATALOG[error.code].http_status, headers=headers,
        dumps=_dumps,
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
        answer = error_response(error)
        if exc.status in (405, 415):  # keep statuses the catalog has no code for
            answer.set_status(exc.status)
        return answer
    except Exception as exc:
        outage = outage_error(exc)  # the vault's own database: 503, not 500
        if outage is None:
            log.exception("unhandled error", extra={"path": request.path})
        request[ERROR_KEY] = error = outage or FederationError(ErrorCode.INTERNAL,
                                                                INTERNAL_MESSAGE)
        return error_response(error)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
