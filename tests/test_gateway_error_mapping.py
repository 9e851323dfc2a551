"""gateway_http/errors.py: the one place a domain error becomes an HTTP answer."""

from __future__ import annotations

import json
import math

import grpc
import pytest

from federation.errors import (
    TRANSPORT_FAILURE_MESSAGE,
    TRANSPORT_RETRY_AFTER_SECONDS,
    ErrorCode,
    FederationError,
    call_error_from_proto,
    call_error_to_proto,
    from_status,
)
from gateway_http.errors import error_response


@pytest.mark.parametrize(("error", "status", "retry_after"), [
    # A node's connection reset arrives with no estimate: a 503 still says when to retry.
    (FederationError(ErrorCode.UNAVAILABLE, "Stream removed"), 503, "1"),
    (FederationError(ErrorCode.UNAVAILABLE, "down", retry_after_seconds=4.2), 503, "5"),
    (FederationError(ErrorCode.RESOURCE_EXHAUSTED, "slow down", retry_after_seconds=0.1),
     429, "1"),
    (FederationError(ErrorCode.INVALID_ARGUMENT, "bad", param="n"), 400, None),
])
def test_statuses_and_retry_after(error: FederationError, status: int,
                                  retry_after: str | None) -> None:
    response = error_response(error)
    assert response.status == status
    assert response.headers.get("Retry-After") == retry_after
    assert response.text is not None
    assert json.loads(response.text)["error"]["message"] == error.message


def test_a_connection_failure_does_not_show_grpcs_text_or_internal_addresses() -> None:
    failed = from_status(grpc.StatusCode.UNAVAILABLE,
                         "failed to connect to all addresses; last error: UNKNOWN: "
                         "ipv4:127.0.0.1:53851: Failed to connect to remote host")
    assert failed.message == TRANSPORT_FAILURE_MESSAGE and "127.0.0.1" not in failed.message
    assert failed.retry_after_seconds == TRANSPORT_RETRY_AFTER_SECONDS
    # A server's own UNAVAILABLE (its trailers mark it) keeps its words for the caller.
    own = FederationError(ErrorCode.UNAVAILABLE, "the database is unavailable; retry shortly",
                          retry_after_seconds=2)
    relayed = from_status(grpc.StatusCode.UNAVAILABLE, own.message, own.trailing_metadata())
    assert (relayed.message, relayed.retry_after_seconds) == (own.message, 2.0)
    # And the same through a stream's per-operation error.
    streamed = call_error_from_proto(call_error_to_proto(own))
    assert streamed.message == own.message and streamed.code is ErrorCode.UNAVAILABLE


def test_a_transport_failure_says_when_to_retry_with_one_value_at_both_edges() -> None:
    """One named default for an UNAVAILABLE without an estimate: what a gRPC client makes
    of a lost connection, and the ``Retry-After`` the gateway sends for such a 503."""
    lost = from_status(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert lost.retry_after_seconds == TRANSPORT_RETRY_AFTER_SECONDS
    without_estimate = error_response(FederationError(ErrorCode.UNAVAILABLE, "Stream removed"))
    assert without_estimate.headers["Retry-After"] == str(
        math.ceil(TRANSPORT_RETRY_AFTER_SECONDS))
    assert error_response(lost).headers["Retry-After"] == without_estimate.headers["Retry-After"]
