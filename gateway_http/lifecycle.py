"""The per-request frame around every handler: request id, metrics, quota and audit.

Runs outside ``error_middleware``, so it sees the final status of every
request, including refused ones, and the ``FederationError`` they carried.
A successful chat completion writes its audit record *before* its response
completes (:func:`record_audit_now`, called by the chat route), so a failure to
audit fails the request. Every other authenticated request (refusals, errors,
listings) has its record spooled to the durable outbox (fsynced) before its
answer leaves, and delivered to thermal memory from there, retried until the
memory node takes it: a memory outage delays those records, it does not lose
them. Settling a request's token reservation to what it used
(``gateway_http.quota``) goes through the same outbox; a request admitted from a quota
lease (``federation.keys.lease_book``) gives back what it did not use to the lease, with
no I/O, and the lease's one settlement is spooled when the lease ends. While the outbox is
full, requests are refused with 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from federation.keys.client import KeyReservation, KeyVerifier, QuotaLeaser
from federation.keys.lease_book import LeaseUse
from federation.logs import (
    REQUEST_ID_HEADER,
    client_request_id,
    client_request_id_var,
    new_request_id,
    request_id_var,
)
from gateway_http.audit import RequestRecord
from gateway_http.chat.serving import ChatOutcome
from gateway_http.errors import ERROR_KEY, error_response
from gateway_http.outbox import OutboxFull
from gateway_http.quota import QUOTA_HOLD, tokens_used
from gateway_http.state import (
    AUDITED,
    CLIENT_REQUEST_ID,
    MODEL,
    OUTCOME,
    PRINCIPAL,
    REQUEST_ID,
    STARTED,
    STATE,
    GatewayState,
)

log = logging.getLogger(__name__)

AUDIT_RECORD = "audit"
"""Outbox kind of a gateway request's audit record (payload: ``RequestRecord`` fields)."""

QUOTA_SETTLEMENT = "quota_settlement"
"""Outbox kind of a token reservation's settlement (payload: :func:`settlement`)."""

QUOTA_LEASE_SETTLEMENT = "quota_lease_settlement"
"""Outbox kind of a quota lease's settlement (payload: ``LeaseUse`` fields)."""

CLIENT_CLOSED = 499
"""Status recorded when the client went away before the response was complete."""

_UPSTREAM_CODES = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL,
                             ErrorCode.DEADLINE_EXCEEDED})


@web.middleware
async def lifecycle_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    # Always our own id: a client's would let it join (or forge) another's audit trail.
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    request_id_var.set(request_id)  # reaches gRPC metadata through channels.py
    client_id = request[CLIENT_REQUEST_ID] = client_request_id(
        request.headers.get(REQUEST_ID_HEADER))
    client_request_id_var.set(client_id)  # a label in the log lines, beside our id
    route = _route_name(request)
    started = request[STARTED] = time.perf_counter()
    if state.outbox.full:  # cannot audit what it would serve: refuse before any work
        full = OutboxFull(state.settings.gateway.outbox_max_records)
        state.metrics.requests.labels(route, "", "503").inc()
        return error_response(full)
    in_flight = state.metrics.labelled(state.metrics.in_flight, route)
    in_flight.inc()
    state.in_progress += 1
    status = CLIENT_CLOSED
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        outcome = request.get(OUTCOME)
        if outcome is not None and outcome.error is None:
            outcome.error = FederationError(ErrorCode.CANCELLED, "the client went away")
        raise
    finally:
        in_flight.dec()
        try:
            await _finish(request, state, route, status, time.perf_counter() - started)
        finally:
            state.in_progress -= 1


SERVER_HEADER = "federation"
"""The ``Server`` header: aiohttp's default names Python's and its own versions, which
tells a scanner which published flaws to try."""


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streams and errors included, carries the
    request id and a ``Server`` header without versions."""
    response.headers["Server"] = SERVER_HEADER
    request_id = request.get(REQUEST_ID)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def _finish(request: web.Request, state: GatewayState, route: str, status: int,
                  elapsed: float) -> None:
    model = request.get(MODEL, "")
    outcome = request.get(OUTCOME)
    error = request.get(ERROR_KEY) or (outcome.error if outcome else None)
    metrics = state.metrics
    metrics.labelled(metrics.requests, route, model, str(status)).inc()
    metrics.labelled(metrics.latency, route, model, str(status)).observe(elapsed)
    if error is not None and error.code in _UPSTREAM_CODES and model:
        metrics.upstream_errors.labels(model, error.code.value).inc()
    if outcome is not None:
        _observe_generation(state, model, outcome, streamed_error=status == 200)
    principal = request.get(PRINCIPAL)
    if principal is None:
        return  # unauthenticated requests are counted, not audited (no flood into the chain)
    # Spooled (durable) before the answer leaves: the response is sent after the middleware.
    hold = request.get(QUOTA_HOLD)
    if hold is not None:
        client_left = status == CLIENT_CLOSED or (
            error is not None and error.code is ErrorCode.CANCELLED)
        used = tokens_used(hold, outcome, client_left=client_left)
        if hold.reservation.leased and state.leases is not None:
            # Folded into its lease, settled (spooled) when the lease ends: no I/O here.
            await state.leases.release(hold.reservation, used)
        else:
            await _spool(state, QUOTA_SETTLEMENT, settlement(hold.reservation, used), "quota")
    if not request.get(AUDITED):
        record = _request_record(request, route, status, elapsed, error)
        await _spool(state, AUDIT_RECORD, dataclasses.asdict(record), "audit")


async def _spool(state: GatewayState, kind: str, payload: dict[str, Any], what: str) -> None:
    try:
        await state.outbox.put(kind, payload)
    except FederationError as exc:
        state.metrics.background_failures.labels(what).inc()
        log.error("a record could not be spooled to the outbox",
                  extra={"kind": kind, "request_id": request_id_var.get(),
                         "error": exc.message})


def settlement(reservation: KeyReservation, used_tokens: int) -> dict[str, Any]:
    """The outbox payload of a settlement (see :func:`settle_from_outbox`)."""
    return {"reservation": dataclasses.asdict(reservation), "used_tokens": used_tokens}


async def settle_from_outbox(keys: KeyVerifier, payload: Mapping[str, Any]) -> None:
    """Deliver a spooled settlement; ``SettleQuota`` is idempotent, so a redelivery after
    a crash charges nothing twice."""
    await keys.settle(KeyReservation(**payload["reservation"]), int(payload["used_tokens"]))


async def settle_lease_from_outbox(leaser: QuotaLeaser, payload: Mapping[str, Any]) -> None:
    """Deliver a spooled lease settlement; ``SettleQuotaLease`` is idempotent."""
    use = LeaseUse(**payload)
    await leaser.settle_lease(use.key_id, use.lease_id, used_tokens=use.used_tokens,
                              used_requests=use.used_requests)


async def record_audit_now(request: web.Request) -> None:
    """Write this successful request's audit record and wait until it is durable.

    Raises :class:`FederationError` (UNAVAILABLE) when it cannot be written: the
    caller then fails the request instead of answering it unaudited.
    """
    state = request.app[STATE]
    record = _request_record(request, _route_name(request), 200,
                             time.perf_counter() - request[STARTED], None)
    try:
        await state.audit.record(record.audit_entry())
    except Exception as exc:
        state.metrics.background_failures.labels("audit").inc()
        # The memory node's reason (e.g. its database out of disk space) is safe to show.
        reason = f" ({exc.message})" if isinstance(exc, FederationError) else ""
        raise FederationError(
            ErrorCode.UNAVAILABLE,
            f"the request could not be recorded in the audit log{reason}, so its result is "
            "withheld; retry shortly",
            retry_after_seconds=1,
        ) from exc
    request[AUDITED] = True


def _request_record(request: web.Request, route: str, status: int, elapsed: float,
                    error: FederationError | None) -> RequestRecord:
    principal = request[PRINCIPAL]
    outcome = request.get(OUTCOME)
    return RequestRecord(
        request_id=request[REQUEST_ID], key_id=principal.key_id, tenant_id=principal.tenant_id,
        route=route, model=request.get(MODEL, ""), status=status, latency_ms=elapsed * 1000,
        prompt_tokens=outcome.prompt_tokens if outcome else 0,
        completion_tokens=outcome.completion_tokens if outcome else 0,
        stream=bool(outcome and outcome.stream),
        finish_reason=outcome.finished.finish_reason if outcome and outcome.finished else "",
        error_code=error.code.value if error else "",
        client_request_id=request.get(CLIENT_REQUEST_ID, ""),
    )


def _observe_generation(state: GatewayState, model: str, outcome: ChatOutcome,
                        *, streamed_error: bool) -> None:
    metrics = state.metrics
    if outcome.first_token_at is not None:
        metrics.labelled(metrics.time_to_first_token, model).observe(
            outcome.first_token_at - outcome.started)
    if outcome.finished is not None:
        metrics.labelled(metrics.tokens, model, "prompt").inc(outcome.prompt_tokens)
        metrics.labelled(metrics.tokens, model, "completion").inc(outcome.completion_tokens)
        if outcome.first_token_at is not None and outcome.finished_at is not None:
            span = outcome.finished_at - outcome.first_token_at
            if span > 0 and outcome.completion_tokens > 1:
                metrics.labelled(metrics.tokens_per_second, model).observe(
                    (outcome.completion_tokens - 1) / span)
    if streamed_error and outcome.error is not None:
        metrics.stream_errors.labels(model, outcome.error.code.value).inc()
