"""gateway_http/errors.py: the one place a domain error becomes an HTTP answer."""

from __future__ import annotations

import json

import pytest

from federation.errors import ErrorCode, FederationError
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
