"""The council over HTTP: ``POST /v1/council/vote``, and the wiring of the ``council``
models into the chat pipeline.

* ``POST /v1/council/vote`` — body ``{"question", "council"?, "rounds"?, "level"?,
  "specialty"?, "stream"?}``; scope ``council`` plus the level's scope. JSON result,
  or with ``"stream": true`` Server-Sent Events: one ``data:`` object per progress
  event (``{"type": "member_started" | "member_voted" | "member_failed" |
  "synthesis_started", ...}``), then ``{"type": "result", ...}``, then ``[DONE]``.
  Disclosure is checked here first (a clean 403 without a gRPC call) and again by the
  council node.
* Models ``council`` and ``council/<sub-council>`` on ``/v1/chat/completions``: the chat
  route's own pipeline, with :class:`~gateway_http.council.serving.CouncilChatBackend`
  answering them (see ``serving.py``).

Wiring: see ``add_council_routes``.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from aiohttp import web

from federation.council.disclosure import BASE_SCOPE, check_access, level_from_int
from federation.council.members import load_roster, members_file_for
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.keys.client import KeyPrincipal
from federation.v1 import council_pb2, council_pb2_grpc
from gateway_http.auth import authenticate
from gateway_http.body import json_body
from gateway_http.chat.routes import MODEL_BACKENDS
from gateway_http.chat.serving import ChatBackend, ChatOutcome
from gateway_http.council import protocol
from gateway_http.council.serving import (
    COUNCIL_GATEWAY,
    CouncilChatBackend,
    CouncilGateway,
    charged,
    metadata,
    next_event,
)
from gateway_http.errors import sse_error
from gateway_http.quota import reserve_council
from gateway_http.state import MODEL, OUTCOME, PRINCIPAL, STATE

__all__ = ["COUNCIL_GATEWAY", "CouncilGateway", "add_council_routes", "council_model_objects"]


def add_council_routes(app: web.Application, *, gateway: CouncilGateway | None = None,
                       chat_models: bool = True) -> None:
    """Add ``POST /v1/council/vote`` and (``chat_models``) the council chat models.

    Production (``gateway=None``): at startup the stub is built on the gateway's
    existing ``council`` channel (``app[STATE].channels["council"]``, from
    ``peers.council``), keys come from ``app[STATE].keys``, and the sub-councils
    from the members file. Call after ``create_app`` builds the app, before it
    starts. The chat models are a backend of the chat route: it asks
    :func:`council_backend` whether a model is the council's.
    """
    if gateway is not None:
        app[COUNCIL_GATEWAY] = gateway
    if any(r.canonical == "/v1/council/vote" for r in app.router.resources()):
        return  # already mounted by create_app; this call only supplied the gateway
    app.on_startup.append(_build_gateway)
    app.router.add_post("/v1/council/vote", council_vote)
    if chat_models:
        app[MODEL_BACKENDS] = [*app.get(MODEL_BACKENDS, ()), council_backend]


def council_backend(app: web.Application, model: str) -> ChatBackend | None:
    """The council's backend for its models; ``None`` for every other model."""
    if not protocol.is_council_model(model) or COUNCIL_GATEWAY not in app:
        return None
    return CouncilChatBackend(app[COUNCIL_GATEWAY])


async def _build_gateway(app: web.Application) -> None:
    if COUNCIL_GATEWAY in app:
        return  # given explicitly (tests, benchmarks)
    state = app[STATE]
    channel = state.channels.get("council")
    if channel is None:
        raise FederationError(ErrorCode.FAILED_PRECONDITION,
                              "the gateway needs the council node: set peers.council")
    settings = state.settings
    roster = load_roster(members_file_for(settings.home, settings.council.members_file))
    app[COUNCIL_GATEWAY] = CouncilGateway(
        council_pb2_grpc.CouncilServiceStub(channel), state.keys,
        settings.council.overall_deadline_seconds + settings.grpc.call_timeout_seconds,
        tuple(roster.councils),
    )


def council_model_objects(app: web.Application) -> list[dict[str, Any]]:
    """The council's entries for ``GET /v1/models`` (OpenAI model objects)."""
    if COUNCIL_GATEWAY not in app:
        return []  # no council node configured: no council models
    councils = app[COUNCIL_GATEWAY].councils
    return [{"id": m, "object": "model", "created": 0, "owned_by": "federation-council"}
            for m in protocol.council_model_ids(councils)]


# ---- POST /v1/council/vote ---------------------------------------------------------------

async def council_vote(request: web.Request) -> web.StreamResponse:
    gateway = request.app[COUNCIL_GATEWAY]
    principal = await authenticate(request, gateway.keys, BASE_SCOPE)
    request[PRINCIPAL] = principal
    body = protocol.parse_vote_body(json_body(request))
    check_access(level_from_int(body.level), principal.scopes)
    request[MODEL] = protocol.COUNCIL_MODEL
    await reserve_council(request, gateway.keys, principal.key_id, body.council, body.rounds)
    outcome = request[OUTCOME] = ChatOutcome(time.perf_counter(), stream=body.stream)
    vote = _vote_request(body, principal)
    if not body.stream:
        try:
            response = await gateway.stub.VoteUnary(
                council_pb2.VoteUnaryRequest(**_fields(vote)), metadata=metadata(principal),
                timeout=gateway.timeout_seconds)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        _charge(outcome, response.result)
        return web.json_response(protocol.result_json(response.result), dumps=protocol.dumps)
    call = gateway.stub.Vote(vote, metadata=metadata(principal), timeout=gateway.timeout_seconds)
    first = await next_event(call)  # errors before the first event keep their HTTP status
    if first is None:
        raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")
    return await _stream_vote(request, call, first, outcome)


async def _stream_vote(request: web.Request, call: Any, first: council_pb2.VoteResponse,
                       outcome: ChatOutcome) -> web.StreamResponse:
    response = web.StreamResponse(headers=protocol.SSE_HEADERS)
    await response.prepare(request)
    try:
        event: council_pb2.VoteResponse | None = first
        while event is not None:
            if event.HasField("result"):
                _charge(outcome, event.result)
            await response.write(protocol.sse(protocol.event_json(event)))
            event = await next_event(call)
    except FederationError as exc:
        outcome.error = exc
        await response.write(sse_error(exc))
    except ConnectionResetError:  # the client went away between two events
        call.cancel()  # stop the council's work
        outcome.error = FederationError(ErrorCode.CANCELLED, "the client went away")
        return response
    except BaseException:
        call.cancel()  # cancelled (the client went away): stop the council's work
        raise
    await response.write(protocol.DONE)
    await response.write_eof()
    return response


def _vote_request(body: protocol.VoteBody, principal: KeyPrincipal) -> council_pb2.VoteRequest:
    return council_pb2.VoteRequest(
        tenant_id=principal.tenant_id, question=body.question[:protocol.MAX_BODY_QUESTION + 1],
        council=body.council, rounds=body.rounds,
        level=body.level,  # type: ignore[arg-type]
        specialty=body.specialty,
    )


def _fields(vote: council_pb2.VoteRequest) -> dict[str, Any]:
    return {f.name: v for f, v in vote.ListFields()}


def _charge(outcome: ChatOutcome, result: council_pb2.CouncilResult) -> None:
    """Record tokens on the outcome: the lifecycle middleware charges and audits them."""
    outcome.finished, outcome.finished_at = charged(result), time.perf_counter()
