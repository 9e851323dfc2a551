"""One error catalog for both edges of the federation.

Domain code raises :class:`FederationError` with an :class:`ErrorCode`. The gRPC
server interceptor turns it into a status (and a ``retry-after-ms`` trailer);
gRPC clients turn the status back into the same error with
:func:`from_rpc_error`; the HTTP gateway maps the code to an HTTP status and an
OpenAI error ``type``. Those mappings live here and nowhere else.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from federation.v1 import common_pb2

RETRY_AFTER_METADATA: Final = "retry-after-ms"
"""Trailing metadata key carrying how long to wait before retrying, in ms."""

PARAM_METADATA: Final = "error-param"
"""Trailing metadata key naming the offending request parameter, if any."""

CODE_METADATA: Final = "error-code"
"""Trailing metadata key carrying the domain code, on every error a federation server
sends: it refines the gRPC status where codes share one (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, OUT_OF_RANGE each carry two), and its presence tells a server's
answer from a transport failure (:func:`from_status`)."""


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DATA_LOSS = "data_loss"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorSpec:
    grpc_status: grpc.StatusCode
    http_status: int
    openai_type: str


CATALOG: Final[dict[ErrorCode, ErrorSpec]] = {
    ErrorCode.INVALID_ARGUMENT: ErrorSpec(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"
    ),
    # The prompt does not fit the model's context: OpenAI's code, which clients look for
    # to shorten a conversation and retry.
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: ErrorSpec(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"
    ),
    ErrorCode.UNAUTHENTICATED: ErrorSpec(
        grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"
    ),
    ErrorCode.PERMISSION_DENIED: ErrorSpec(
        grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"
    ),
    ErrorCode.NOT_FOUND: ErrorSpec(grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    ErrorCode.ALREADY_EXISTS: ErrorSpec(grpc.StatusCode.ALREADY_EXISTS, 409, "conflict_error"),
    ErrorCode.FAILED_PRECONDITION: ErrorSpec(
        grpc.StatusCode.FAILED_PRECONDITION, 409, "conflict_error"
    ),
    ErrorCode.ABORTED: ErrorSpec(grpc.StatusCode.ABORTED, 409, "conflict_error"),
    ErrorCode.OUT_OF_RANGE: ErrorSpec(
        grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error"
    ),
    ErrorCode.RESOURCE_EXHAUSTED: ErrorSpec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"
    ),
    # A key's token quota cannot cover the request (OpenAI's own type and code), or an
    # edge device's upload quota cannot take the upload.
    ErrorCode.INSUFFICIENT_QUOTA: ErrorSpec(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "insufficient_quota"
    ),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorSpec(
        grpc.StatusCode.OUT_OF_RANGE, 413, "invalid_request_error"
    ),
    ErrorCode.DATA_LOSS: ErrorSpec(grpc.StatusCode.DATA_LOSS, 400, "invalid_request_error"),
    ErrorCode.UNAVAILABLE: ErrorSpec(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ErrorCode.DEADLINE_EXCEEDED: ErrorSpec(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    ErrorCode.CANCELLED: ErrorSpec(grpc.StatusCode.CANCELLED, 499, "cancelled"),
    ErrorCode.UNIMPLEMENTED: ErrorSpec(grpc.StatusCode.UNIMPLEMENTED, 501, "not_implemented"),
    ErrorCode.INTERNAL: ErrorSpec(grpc.StatusCode.INTERNAL, 500, "server_error"),
}

# The first code listed for a status is the one the bare status maps back to; the
# CODE_METADATA trailer names the others.
_BY_GRPC_STATUS: Final = {
    spec.grpc_status: code for code, spec in reversed(CATALOG.items())
}

INTERNAL_MESSAGE: Final = "Internal server error."
TRANSPORT_FAILURE_MESSAGE: Final = ("a federation node could not be reached (its connection "
                                    "failed or was lost); retry shortly")
TRANSPORT_RETRY_AFTER_SECONDS: Final = 1.0
"""When to retry an UNAVAILABLE that came without an estimate of its own: a connection
that failed or was lost (gRPC's status, no server trailer), a stream cut or timed out.
Both edges use it: :func:`from_status` on the gRPC side, the gateway's ``Retry-After``
of such a 503 on the HTTP side. A reconnect takes about that long."""


class FederationError(Exception):
    """An error whose message is safe to show to the caller."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_seconds = retry_after_seconds

    @property
    def spec(self) -> ErrorSpec:
        return CATALOG[self.code]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        if self.retry_after_seconds is not None:
            pairs.append((RETRY_AFTER_METADATA, str(math.ceil(self.retry_after_seconds * 1000))))
        if self.param:
            pairs.append((PARAM_METADATA, self.param))
        # Always sent: it also marks the status as a federation server's own answer, which
        # a connection failure (gRPC's text, with internal addresses) is not.
        pairs.append((CODE_METADATA, self.code.value))
        return tuple(pairs)

    def __repr__(self) -> str:
        return f"FederationError({self.code.name}, {self.message!r})"


class CommandError(Exception):
    """A failure of a command (the CLI, ``federation up``) that the operator can fix:
    reported as one line on stderr with a non-zero exit code, never a traceback."""


def from_rpc_error(err: grpc.aio.AioRpcError | grpc.RpcError) -> FederationError:
    """Turn a failed gRPC call back into the domain error the server raised."""
    status = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else None
    trailers: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return from_status(status, details, trailers or ())


def call_error_to_proto(error: FederationError) -> common_pb2.CallError:
    """``error`` as one operation's outcome on a stream that carries many, where no call
    status can carry it: the status and trailers a failed call would have had."""
    trailers = dict(error.trailing_metadata())
    return common_pb2.CallError(
        code=error.spec.grpc_status.value[0], message=error.message, param=error.param or "",
        federation_code=trailers.get(CODE_METADATA, ""),
        retry_after_ms=int(trailers.get(RETRY_AFTER_METADATA, 0)))


def call_error_from_proto(error: common_pb2.CallError) -> FederationError:
    return from_status(
        _STATUS_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN), error.message,
        ((PARAM_METADATA, error.param), (CODE_METADATA, error.federation_code),
         (RETRY_AFTER_METADATA, error.retry_after_ms)))


_STATUS_BY_NUMBER: Final = {status.value[0]: status for status in grpc.StatusCode}


def from_status(status: grpc.StatusCode, details: str | None,
                trailers: Iterable[tuple[str, Any]] = ()) -> FederationError:
    """The domain error of a gRPC status, its details and trailers (``trailing_metadata``
    of a call, or the same pairs carried in a message)."""
    code = _BY_GRPC_STATUS.get(status, ErrorCode.INTERNAL)
    retry_after: float | None = None
    param: str | None = None
    from_a_server = False
    for key, value in trailers:
        if not value:
            continue
        if key == RETRY_AFTER_METADATA:
            retry_after = int(value) / 1000
        elif key == PARAM_METADATA:
            param = str(value)
        elif key == CODE_METADATA:
            code = _refined(code, str(value))
            from_a_server = True
    message = details or status.name.lower()
    if code is ErrorCode.UNAVAILABLE and not from_a_server:
        # gRPC's own words for a failed or lost connection ("failed to connect to all
        # addresses; … ipv4:10.0.0.7:50051 …"): internal addresses, no use to a caller.
        message = TRANSPORT_FAILURE_MESSAGE
        retry_after = retry_after if retry_after is not None else TRANSPORT_RETRY_AFTER_SECONDS
    return FederationError(code, message, param=param, retry_after_seconds=retry_after)


def _refined(code: ErrorCode, value: str) -> ErrorCode:
    """The trailer's code when it names one with the same gRPC status; else ``code``."""
    try:
        named = ErrorCode(value)
    except ValueError:
        return code
    return named if CATALOG[named].grpc_status is CATALOG[code].grpc_status else code
