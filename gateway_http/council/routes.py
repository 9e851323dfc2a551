"""The council over HTTP: ``POST /v1/council/vote`` and the ``council`` OpenAI models.

Thin adapters: every request becomes one CouncilService call made with the
gateway's identity, carrying the API key's scopes in ``x-federation-key-scopes``
metadata (the council node trusts that header from the gateway role only) and
the request id in ``x-request-id``. Disclosure is checked here first (a clean 403
without a gRPC call) and again by the council node.

* ``POST /v1/council/vote`` — body ``{"question", "council"?, "rounds"?, "level"?,
  "specialty"?, "stream"?}``; scope ``council`` plus the level's scope. JSON result,
  or with ``"stream": true`` Server-Sent Events: one ``data:`` object per progress
  event (``{"type": "member_started" | "member_voted" | "member_failed" |
  "synthesis_started", ...}``), then ``{"type": "result", ...}``, then ``[DONE]``.
* Models ``council`` and ``council/<sub-council>`` on ``/v1/chat/completions``: the
  last user message is the question, the synthesis is the message content, and an
  extra ``council`` object carries decision, confidence, quorum and request id.
  Streaming sends SSE comments while members vote (keeping proxies from timing
  out), then the answer as content chunks; the last chunk carries ``council``.

Wiring: see ``add_council_routes``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from federation.council.disclosure import (
    BASE_SCOPE,
    SCOPES_METADATA,
    check_access,
    level_from_int,
)
from federation.council.members import load_roster, members_file_for
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.inference.types import GenerationFinished
from federation.keys.client import KeyPrincipal, KeyVerifier
from federation.logs import REQUEST_ID_HEADER, request_id_var
from federation.v1 import council_pb2, council_pb2_grpc
from gateway_http.auth import authenticate
from gateway_http.body import json_body
from gateway_http.chat.protocol import ChunkWriter, completion_id, completion_object
from gateway_http.chat.serving import ChatOutcome
from gateway_http.council import protocol
from gateway_http.errors import sse_error
from gateway_http.quota import reserve_council
from gateway_http.state import MODEL, OUTCOME, PRINCIPAL, REQUEST_ID, STATE

log = logging.getLogger(__name__)

@dataclass
class CouncilGateway:
    """What the handlers need: the CouncilService stub, keys, deadline, sub-councils."""

    stub: council_pb2_grpc.CouncilServiceAsyncStub
    keys: KeyVerifier
    timeout_seconds: float
    councils: Sequence[str]
    """Sub-council names, for the ``council/<name>`` models."""


COUNCIL_GATEWAY = web.AppKey("council_gateway", CouncilGateway)


def add_council_routes(
    app: web.Application,
    *,
    gateway: CouncilGateway | None = None,
    chat_models: bool = True,
) -> None:
    """Add ``POST /v1/council/vote`` and (``chat_models``) the council chat models.

    Production (``gateway=None``): at startup the stub is built on the gateway's
    existing ``council`` channel (``app[STATE].channels["council"]``, from
    ``peers.council``), keys come from ``app[STATE].keys``, and the sub-councils
    from the members file. Call after ``create_app`` builds the app, before it
    starts. The chat models are served by a middleware that answers
    ``POST /v1/chat/completions`` for ``council``/``council/<name>`` and passes
    every other request through untouched.
    """
    if gateway is not None:
        app[COUNCIL_GATEWAY] = gateway
    if any(r.canonical == "/v1/council/vote" for r in app.router.resources()):
        return  # already mounted by create_app; this call only supplied the gateway
    app.on_startup.append(_build_gateway)
    app.router.add_post("/v1/council/vote", council_vote)
    if chat_models:
        app.middlewares.append(council_chat_middleware)


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
    metadata = _metadata(request, principal)
    if not body.stream:
        try:
            response = await gateway.stub.VoteUnary(
                council_pb2.VoteUnaryRequest(**_fields(vote)), metadata=metadata,
                timeout=gateway.timeout_seconds)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        _charge(outcome, response.result)
        return web.json_response(protocol.result_json(response.result), dumps=protocol.dumps)
    call = gateway.stub.Vote(vote, metadata=metadata, timeout=gateway.timeout_seconds)
    first = await _first(call)  # errors before the first event keep their HTTP status
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
            event = await _next(call)
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


# ---- /v1/chat/completions for council models ---------------------------------------------

@web.middleware
async def council_chat_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer chat completions addressed to a council model; pass the rest through."""
    if request.method == "POST" and request.path == "/v1/chat/completions":
        model = protocol.peek_model(json_body(request))
        if model is not None and protocol.is_council_model(model):
            return await council_chat_completion(request, model)
    response: web.StreamResponse = await handler(request)
    return response


async def council_chat_completion(request: web.Request, model: str) -> web.StreamResponse:
    """The chat-completions answer of the council (callable directly from a router too)."""
    gateway = request.app[COUNCIL_GATEWAY]
    principal = await authenticate(request, gateway.keys, BASE_SCOPE)
    request[PRINCIPAL] = principal
    council = model.partition("/")[2]
    if model not in protocol.council_model_ids(gateway.councils):
        raise FederationError(ErrorCode.NOT_FOUND, f"The model '{model}' does not exist",
                              param="model")
    data = json_body(request)
    if not isinstance(data, dict):
        raise protocol.invalid(None, "The request body must be a JSON object.")
    question = protocol.last_user_message(data.get("messages"))
    request[MODEL] = model
    await reserve_council(request, gateway.keys, principal.key_id, council, 0)
    stream = data.get("stream") is True
    outcome = request[OUTCOME] = ChatOutcome(time.perf_counter(), stream=stream)
    vote = council_pb2.VoteRequest(question=question, council=council,
                                   tenant_id=principal.tenant_id,
                                   level=council_pb2.DISCLOSURE_LEVEL_ANSWER)
    call = gateway.stub.Vote(vote, metadata=_metadata(request, principal),
                             timeout=gateway.timeout_seconds)
    first = await _first(call)
    if not stream:
        result = await _drain(call, first)
        finished = _charge(outcome, result)
        body = completion_object(completion_id(), model, result.answer, finished)
        body["council"] = protocol.council_extra(result)
        return web.json_response(body, dumps=protocol.dumps)
    return await _stream_chat(request, call, first, model, outcome, data)


async def _stream_chat(request: web.Request, call: Any, first: council_pb2.VoteResponse,
                       model: str, outcome: ChatOutcome, data: dict[str, Any]
                       ) -> web.StreamResponse:
    options = data.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunks = ChunkWriter(completion_id(), model, include_usage)
    response = web.StreamResponse(headers=protocol.SSE_HEADERS)
    await response.prepare(request)
    try:
        await response.write(chunks.delta({"role": "assistant", "content": ""}))
        event: council_pb2.VoteResponse | None = first
        while event is not None and not event.HasField("result"):
            await response.write(protocol.comment(event))
            event = await _next(call)
        if event is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")
        result = event.result
        finished = _charge(outcome, result)
        for piece in protocol.pieces(result.answer):
            await response.write(chunks.delta({"content": piece}))
        last = json.loads(chunks.delta({}, "stop")[len(b"data: "):])
        last["council"] = protocol.council_extra(result)
        await response.write(protocol.sse(last))
        if include_usage:
            await response.write(chunks.usage(finished))
    except FederationError as exc:
        outcome.error = exc
        await response.write(sse_error(exc))
    except BaseException:
        call.cancel()
        raise
    await response.write(protocol.DONE)
    await response.write_eof()
    return response


# ---- helpers -----------------------------------------------------------------------------

def _vote_request(body: protocol.VoteBody, principal: KeyPrincipal) -> council_pb2.VoteRequest:
    return council_pb2.VoteRequest(
        tenant_id=principal.tenant_id, question=body.question[:protocol.MAX_BODY_QUESTION + 1],
        council=body.council, rounds=body.rounds,
        level=body.level,  # type: ignore[arg-type]
        specialty=body.specialty,
    )


def _fields(vote: council_pb2.VoteRequest) -> dict[str, Any]:
    return {f.name: v for f, v in vote.ListFields()}


def _metadata(request: web.Request, principal: KeyPrincipal) -> tuple[tuple[str, str], ...]:
    request_id = request.get(REQUEST_ID) or request_id_var.get() or "req_" + uuid.uuid4().hex
    return ((SCOPES_METADATA, ",".join(sorted(principal.scopes))),
            (REQUEST_ID_HEADER, request_id))


async def _first(call: Any) -> council_pb2.VoteResponse:
    event = await _next(call)
    if event is None:
        raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")
    return event


async def _next(call: Any) -> council_pb2.VoteResponse | None:
    try:
        event = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    if event is grpc.aio.EOF:
        return None
    assert isinstance(event, council_pb2.VoteResponse)
    return event


async def _drain(call: Any, first: council_pb2.VoteResponse) -> council_pb2.CouncilResult:
    event: council_pb2.VoteResponse | None = first
    while event is not None:
        if event.HasField("result"):
            return event.result
        event = await _next(call)
    raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")


def _charge(outcome: ChatOutcome, result: council_pb2.CouncilResult) -> GenerationFinished:
    """Record tokens on the outcome: the lifecycle middleware charges and audits them."""
    finished = GenerationFinished("stop", result.usage.prompt_tokens,
                                  result.usage.completion_tokens, protocol.COUNCIL_MODEL)
    outcome.finished, outcome.finished_at = finished, time.perf_counter()
    return finished
