"""HTTP routes of chat completions, and the one pipeline every generation route runs.

Only this module knows HTTP; serving does the work. ``POST /v1/chat/completions``
resolves its model to a backend (the council for ``council`` and ``council/<name>``,
registered by ``gateway_http.council``; the inference nodes otherwise) and runs
:func:`serve`, the steps every generating request shares whatever answers it:
authentication with the backend's scope, parsing, the model check, the token
reservation, the tenant's transcript, the audit record written before the answer leaves
(:func:`~gateway_http.lifecycle.record_audit_now`; before ``[DONE]`` on a stream), and
errors in OpenAI's shape. ``/v1/completions`` runs the same :func:`serve`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from federation.keys.client import KeyPrincipal
from gateway_http.auth import authenticate
from gateway_http.body import json_body, json_response
from gateway_http.chat.backends import InferenceChatBackend
from gateway_http.chat.protocol import ChatCall, parse_chat_request
from gateway_http.chat.responses import ChatShape
from gateway_http.chat.serving import DONE, ChatBackend, ChatOutcome, ResponseShape
from gateway_http.errors import sse_error
from gateway_http.lifecycle import record_audit_now
from gateway_http.quota import refused_by_node
from gateway_http.state import MODEL, OUTCOME, PRINCIPAL, STARTED, STATE

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not hold tokens back
}

BackendResolver = Callable[[web.Application, str], ChatBackend | None]
MODEL_BACKENDS = web.AppKey("model_backends", list[BackendResolver])
"""Backends for models beyond the inference nodes' (the council registers its own),
asked in order; the first that claims a model answers it."""


def backend_for(app: web.Application, model: Any) -> ChatBackend:
    """The backend answering ``model`` (the body's value, unchecked)."""
    if isinstance(model, str):
        for resolve in app.get(MODEL_BACKENDS, ()):
            backend = resolve(app, model)
            if backend is not None:
                return backend
    return inference_backend(app)


def refuse_chat_only_model(app: web.Application, model: str, endpoint: str) -> None:
    """A model another backend answers (a council's) is a chat model only: NOT_FOUND
    saying so, rather than "does not exist" for an id ``/v1/models`` lists."""
    if any(resolve(app, model) is not None for resolve in app.get(MODEL_BACKENDS, ())):
        raise FederationError(ErrorCode.NOT_FOUND, f"The model '{model}' answers on "
                              f"/v1/chat/completions only, not on {endpoint}",
                              param="model")


def inference_backend(app: web.Application) -> InferenceChatBackend:
    state = app[STATE]
    return InferenceChatBackend(state.router, state.settings.gateway.request_timeout_seconds)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = json_body(request)
    backend = backend_for(request.app, body.get("model") if isinstance(body, dict) else None)
    principal = await authenticated(request, backend.scope)
    call = parse_chat_request(body, principal.tenant_id)
    generation = call.generation
    shape = ChatShape(call.model, logprobs=generation.logprobs is not None,
                      include_usage=call.include_usage,
                      forced_call=generation.calls_tools and generation.tool_choice.forces_call)
    return await serve(request, backend, principal, call, shape)


async def authenticated(request: web.Request, scope: str) -> KeyPrincipal:
    principal = await authenticate(request, request.app[STATE].keys, scope)
    request[PRINCIPAL] = principal
    return principal


async def serve(request: web.Request, backend: ChatBackend, principal: KeyPrincipal,
                call: ChatCall, shape: ResponseShape) -> web.StreamResponse:
    """The shared steps after parsing: check, reserve, generate, audit, answer."""
    state = request.app[STATE]
    backend.check(call)
    request[MODEL] = call.model
    budget = await backend.reserve(request, principal, call)
    outcome = request[OUTCOME] = ChatOutcome(request[STARTED], stream=call.stream,
                                             choices=len(call.generations), n=call.n,
                                             paced=backend.paced)
    try:
        result = await state.chat.create(call.with_budget(budget), backend, principal, shape,
                                         outcome)
    except FederationError as error:
        raise await refused_by_node(request, state.keys, error) from None
    if isinstance(result, dict):
        await record_audit_now(request)  # no answer leaves unaudited
        return json_response(result)
    return await _stream(request, result, outcome)


async def _stream(request: web.Request, events: AsyncGenerator[bytes, None],
                  outcome: ChatOutcome) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    # Closing the event iterator cancels the gRPC call, so a client that goes
    # away stops the generation on the inference node (or the council's vote).
    async with contextlib.aclosing(events):
        await response.prepare(request)
        try:
            async for data in events:
                if data == DONE and outcome.error is None:
                    data = await _audited_end(request, outcome)
                await response.write(data)
        except ConnectionResetError:
            outcome.error = FederationError(ErrorCode.CANCELLED, "the client went away")
            return response
    await response.write_eof()
    return response


async def _audited_end(request: web.Request, outcome: ChatOutcome) -> bytes:
    """``[DONE]`` once the audit record is durable; an error event first if it is not."""
    try:
        await record_audit_now(request)
    except FederationError as error:
        outcome.error = error
        return sse_error(error) + DONE
    return DONE


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
