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
from typing import Any, Final

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
from gateway_http.errors import AUTH_STATUSES, BODY_STATUSES, EDGE_STATUSES, sse_error
from gateway_http.quota import reserve_council
from gateway_http.state import MODEL, OUTCOME, PRINCIPAL, REQUEST_ID, STATE

log = logging.getLogger(__name__)

COUNCIL_MODEL: Final = "council"
MAX_BODY_QUESTION: Final = 4000
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                       "X-Accel-Buffering": "no"}
_DONE: Final = b"data: [DONE]\n\n"
_DECISIONS: Final = {council_pb2.DECISION_AUTHORIZED: "authorized",
                     council_pb2.DECISION_BLOCKED: "blocked",
                     council_pb2.DECISION_NEEDS_REVIEW: "needs_review"}
_STANCES: Final = {council_pb2.STANCE_APPROVE: "approve", council_pb2.STANCE_REJECT: "reject",
                   council_pb2.STANCE_ABSTAIN: "abstain"}


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


def council_model_ids(councils: Sequence[str]) -> list[str]:
    return [COUNCIL_MODEL, *(f"{COUNCIL_MODEL}/{name}" for name in councils)]


def council_model_objects(app: web.Application) -> list[dict[str, Any]]:
    """The council's entries for ``GET /v1/models`` (OpenAI model objects)."""
    if COUNCIL_GATEWAY not in app:
        return []  # no council node configured: no council models
    councils = app[COUNCIL_GATEWAY].councils
    return [{"id": m, "object": "model", "created": 0, "owned_by": "federation-council"}
            for m in council_model_ids(councils)]


def is_council_model(model: str) -> bool:
    return model == COUNCIL_MODEL or model.startswith(COUNCIL_MODEL + "/")


# ---- POST /v1/council/vote ---------------------------------------------------------------

@dataclass(frozen=True)
class VoteBody:
    question: str
    council: str = ""
    rounds: int = 0
    level: int = 1
    specialty: str = ""
    stream: bool = False


def parse_vote_body(data: Any) -> VoteBody:
    """``data``: the parsed JSON body (``gateway_http/body.py``; ``None`` without one)."""
    if not isinstance(data, dict):
        raise _invalid(None, "The request body must be a JSON object.")
    question = data.get("question")
    if question is None:
        raise _invalid("question", "Missing required parameter: 'question'.")
    if not isinstance(question, str):
        raise _invalid("question", "Invalid type for 'question': expected a string, got "
                                   f"{_json_type(question)}.")
    if not question.strip():
        raise _invalid("question", "Invalid value for 'question': it must not be empty.")
    fields: dict[str, Any] = {"question": question}
    for name, kind in (("council", str), ("specialty", str), ("rounds", int), ("level", int),
                       ("stream", bool)):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _invalid(name, f"Invalid type for '{name}': expected {_JSON_TYPES[kind]}, "
                                 f"got {_json_type(value)}.")
        fields[name] = value
    unknown = sorted(set(data) - {"question", "council", "specialty", "rounds", "level",
                                  "stream"})
    if unknown:
        log.info("ignored request fields", extra={"fields": ",".join(unknown)})
    body = VoteBody(**fields)
    if body.rounds not in (0, 1, 2):
        raise _invalid("rounds", "Invalid value for 'rounds': 1 or 2.")
    level_from_int(body.level)
    return body


async def council_vote(request: web.Request) -> web.StreamResponse:
    gateway = request.app[COUNCIL_GATEWAY]
    principal = await authenticate(request, gateway.keys, BASE_SCOPE)
    request[PRINCIPAL] = principal
    body = parse_vote_body(json_body(request))
    check_access(level_from_int(body.level), principal.scopes)
    request[MODEL] = COUNCIL_MODEL
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
        return web.json_response(result_json(response.result), dumps=_dumps)
    call = gateway.stub.Vote(vote, metadata=metadata, timeout=gateway.timeout_seconds)
    first = await _first(call)  # errors before the first event keep their HTTP status
    return await _stream_vote(request, call, first, outcome)


async def _stream_vote(request: web.Request, call: Any, first: council_pb2.VoteResponse,
                       outcome: ChatOutcome) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        event: council_pb2.VoteResponse | None = first
        while event is not None:
            if event.HasField("result"):
                _charge(outcome, event.result)
            await response.write(_sse(event_json(event)))
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
    await response.write(_DONE)
    await response.write_eof()
    return response


# ---- /v1/chat/completions for council models ---------------------------------------------

@web.middleware
async def council_chat_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer chat completions addressed to a council model; pass the rest through."""
    if request.method == "POST" and request.path == "/v1/chat/completions":
        model = _peek_model(json_body(request))
        if model is not None and is_council_model(model):
            return await council_chat_completion(request, model)
    response: web.StreamResponse = await handler(request)
    return response


async def council_chat_completion(request: web.Request, model: str) -> web.StreamResponse:
    """The chat-completions answer of the council (callable directly from a router too)."""
    gateway = request.app[COUNCIL_GATEWAY]
    principal = await authenticate(request, gateway.keys, BASE_SCOPE)
    request[PRINCIPAL] = principal
    council = model.partition("/")[2]
    if model not in council_model_ids(gateway.councils):
        raise FederationError(ErrorCode.NOT_FOUND, f"The model '{model}' does not exist",
                              param="model")
    data = json_body(request)
    if not isinstance(data, dict):
        raise _invalid(None, "The request body must be a JSON object.")
    question = _last_user_message(data.get("messages"))
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
        body["council"] = council_extra(result)
        return web.json_response(body, dumps=_dumps)
    return await _stream_chat(request, call, first, model, outcome, data)


async def _stream_chat(request: web.Request, call: Any, first: council_pb2.VoteResponse,
                       model: str, outcome: ChatOutcome, data: dict[str, Any]
                       ) -> web.StreamResponse:
    options = data.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunks = ChunkWriter(completion_id(), model, include_usage)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        await response.write(chunks.delta({"role": "assistant", "content": ""}))
        event: council_pb2.VoteResponse | None = first
        while event is not None and not event.HasField("result"):
            await response.write(_comment(event))
            event = await _next(call)
        if event is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")
        result = event.result
        finished = _charge(outcome, result)
        for piece in _pieces(result.answer):
            await response.write(chunks.delta({"content": piece}))
        last = json.loads(chunks.delta({}, "stop")[len(b"data: "):])
        last["council"] = council_extra(result)
        await response.write(_sse(last))
        if include_usage:
            await response.write(chunks.usage(finished))
    except FederationError as exc:
        outcome.error = exc
        await response.write(sse_error(exc))
    except BaseException:
        call.cancel()
        raise
    await response.write(_DONE)
    await response.write_eof()
    return response


# ---- conversions -------------------------------------------------------------------------

def result_json(result: council_pb2.CouncilResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "object": "council.result",
        "request_id": result.request_id,
        "answer": result.answer,
        "decision": _DECISIONS.get(result.decision, "needs_review"),
        "confidence": result.confidence,
        "concerns": list(result.concerns),
        "fallback_synthesis": result.fallback_synthesis,
        "rounds": result.rounds,
        "level": int(result.level),
        "quorum": {
            "asked": result.quorum.asked, "voted": result.quorum.voted,
            "required": result.quorum.required,
            "missing": [{"member": m.member, "reason": m.reason}
                        for m in result.quorum.missing],
        },
        "usage": {"prompt_tokens": result.usage.prompt_tokens,
                  "completion_tokens": result.usage.completion_tokens,
                  "total_tokens": result.usage.total_tokens},
    }
    if result.level >= council_pb2.DISCLOSURE_LEVEL_CHIEFS:
        body["members"] = [member_json(m) for m in result.members]
    if result.audit_sequences:
        body["audit_sequences"] = list(result.audit_sequences)
    return body


def member_json(vote: council_pb2.MemberVote) -> dict[str, Any]:
    out: dict[str, Any] = {
        "member": vote.member, "name": vote.display_name, "specialty": vote.specialty,
        "round": vote.round, "stance": _STANCES.get(vote.stance, "abstain"),
        "confidence": vote.confidence, "concerns": list(vote.concerns),
    }
    if vote.rationale:
        out["rationale"] = vote.rationale
    if vote.HasField("latency"):
        out["latency_ms"] = round(vote.latency.ToNanoseconds() / 1e6, 3)
    if vote.prompt_sha256:
        out["prompt_sha256"] = vote.prompt_sha256
    return out


def event_json(event: council_pb2.VoteResponse) -> dict[str, Any]:
    kind = event.WhichOneof("event")
    if kind == "member_started":
        return {"type": kind, "member": event.member_started.member,
                "round": event.member_started.round}
    if kind == "member_voted":
        voted = event.member_voted
        out: dict[str, Any] = {"type": kind, "member": voted.member, "round": voted.round}
        if voted.HasField("vote"):
            out["vote"] = member_json(voted.vote)
        return out
    if kind == "member_failed":
        failed = event.member_failed
        return {"type": kind, "member": failed.member, "round": failed.round,
                "reason": failed.reason}
    if kind == "synthesis_started":
        return {"type": kind, "vote_count": event.synthesis_started.vote_count}
    return {"type": "result", **result_json(event.result)}


def council_extra(result: council_pb2.CouncilResult) -> dict[str, Any]:
    """The ``council`` object added to chat completions."""
    return {
        "request_id": result.request_id,
        "decision": _DECISIONS.get(result.decision, "needs_review"),
        "confidence": result.confidence,
        "concerns": list(result.concerns),
        "fallback_synthesis": result.fallback_synthesis,
        "quorum": {"asked": result.quorum.asked, "voted": result.quorum.voted,
                   "required": result.quorum.required,
                   "missing": [{"member": m.member, "reason": m.reason}
                               for m in result.quorum.missing]},
    }


# ---- helpers -----------------------------------------------------------------------------

def _vote_request(body: VoteBody, principal: KeyPrincipal) -> council_pb2.VoteRequest:
    return council_pb2.VoteRequest(
        tenant_id=principal.tenant_id, question=body.question[:MAX_BODY_QUESTION + 1],
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
                                  result.usage.completion_tokens, COUNCIL_MODEL)
    outcome.finished, outcome.finished_at = finished, time.perf_counter()
    return finished


def _peek_model(data: Any) -> str | None:
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _last_user_message(messages: Any) -> str:
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):  # text parts
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if isinstance(content, str) and content.strip():
                    return content
    raise _invalid("messages", "The council needs a user message with the question.")


def _pieces(text: str, size: int = 48) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _comment(event: council_pb2.VoteResponse) -> bytes:
    info = event_json(event)
    return (": " + json.dumps(info, separators=(",", ":")) + "\n\n").encode()


def _sse(value: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(value).encode() + b"\n\n"


_JSON_TYPES: Final = {str: "a string", int: "an integer", bool: "a boolean"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def _invalid(param: str | None, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ---- OpenAPI -----------------------------------------------------------------------------

_ERROR: Final = {"$ref": "#/components/responses/Error"}

OPENAPI_SCHEMAS: Final[dict[str, Any]] = {
    "CouncilVoteRequest": {
        "type": "object", "required": ["question"],
        "properties": {
            "question": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_QUESTION},
            "council": {"type": "string", "description": "Sub-council (technical, security, "
                        "ethics, strategic); omitted: the full council."},
            "rounds": {"enum": [1, 2], "description": "2: members revise after seeing the "
                       "anonymised round-1 votes and concerns."},
            "level": {"enum": [1, 2, 3, 4], "default": 1, "description":
                      "Disclosure: 1 answer (scope council), 2 + members' stances "
                      "(council:chiefs), 3 + one specialty's full record "
                      "(council:specialist), 4 everything (memory:audit)."},
            "specialty": {"type": "string", "description": "Required for level 3."},
            "stream": {"type": "boolean"},
        },
    },
    "CouncilMemberVote": {
        "type": "object", "required": ["member", "stance", "confidence", "concerns", "round"],
        "properties": {
            "member": {"type": "string"}, "name": {"type": "string"},
            "specialty": {"type": "string"}, "round": {"type": "integer"},
            "stance": {"enum": ["approve", "reject", "abstain"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "concerns": {"type": "array", "items": {"type": "string"}},
            "rationale": {"type": "string"}, "latency_ms": {"type": "number"},
            "prompt_sha256": {"type": "string"},
        },
    },
    "CouncilResult": {
        "type": "object",
        "required": ["request_id", "answer", "decision", "confidence", "quorum"],
        "properties": {
            "object": {"const": "council.result"},
            "request_id": {"type": "string"},
            "answer": {"type": "string"},
            "decision": {"enum": ["authorized", "blocked", "needs_review"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "concerns": {"type": "array", "items": {"type": "string"}},
            "fallback_synthesis": {"type": "boolean"},
            "rounds": {"type": "integer"}, "level": {"type": "integer"},
            "quorum": {"type": "object", "properties": {
                "asked": {"type": "integer"}, "voted": {"type": "integer"},
                "required": {"type": "integer"},
                "missing": {"type": "array", "items": {"type": "object", "properties": {
                    "member": {"type": "string"}, "reason": {"type": "string"}}}}}},
            "members": {"type": "array",
                        "items": {"$ref": "#/components/schemas/CouncilMemberVote"}},
            "usage": {"type": "object"},
            "audit_sequences": {"type": "array", "items": {"type": "integer"}},
        },
    },
}

OPENAPI_PATHS: Final[dict[str, Any]] = {
    "/v1/council/vote": {"post": {
        "operationId": "councilVote",
        "summary": "Ask the specialist council; answer, decision and confidence.",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/CouncilVoteRequest"}}}},
        "responses": {
            "200": {"description": "The council's result (JSON), or with stream=true "
                    "Server-Sent Events: progress objects with a `type`, then the result "
                    "(`type: result`), then `[DONE]`.",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CouncilResult"}},
                        "text/event-stream": {"schema": {"type": "string"}}}},
            **{str(status): _ERROR for status in sorted(
                {404, 409, 429, *EDGE_STATUSES, *AUTH_STATUSES, *BODY_STATUSES})},
        },
    }},
}
