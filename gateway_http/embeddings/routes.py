"""``POST /v1/embeddings``, scope ``embeddings`` (a key for a retrieval pipeline need not
generate anything). The same guarantees as every route: the key's scope, a reservation
of the inputs' most tokens before the node embeds them (the node refuses inputs that need
more), the audit record written before the vectors leave, settlement to the node's count
through the outbox, errors in OpenAI's shape."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from federation.inference.client import InferenceRouter
from federation.inference.types import (
    Embedding,
    EmbeddingRequest,
    EmbeddingsFinished,
    GenerationFinished,
)
from gateway_http.body import json_body, json_response
from gateway_http.chat.routes import authenticated, refuse_chat_only_model
from gateway_http.chat.serving import ChatOutcome
from gateway_http.embeddings.protocol import embeddings_object, parse_embeddings_request
from gateway_http.lifecycle import record_audit_now
from gateway_http.quota import refused_by_node, reserve_embedding
from gateway_http.state import MODEL, OUTCOME, STARTED, STATE

EMBEDDINGS_SCOPE = "embeddings"


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = await authenticated(request, EMBEDDINGS_SCOPE)
    call = parse_embeddings_request(json_body(request), principal.tenant_id)
    refuse_chat_only_model(request.app, call.request.model, "/v1/embeddings")
    state.router.check_model(call.request.model)
    request[MODEL] = call.request.model
    reservation = await reserve_embedding(request, principal.key_id, call.request)
    outcome = request[OUTCOME] = ChatOutcome(request[STARTED], paced=False)
    try:
        vectors, finished = await embed(
            state.router, replace(call.request, token_budget=reservation.token_budget),
            state.settings.gateway.request_timeout_seconds)
    except FederationError as error:
        raise await refused_by_node(request, state.keys, error) from None
    outcome.finished = GenerationFinished("stop", finished.prompt_tokens, 0,
                                          call.request.model)
    await record_audit_now(request)  # no vector leaves unaudited
    body = embeddings_object(call.request.model, vectors, finished.prompt_tokens,
                             call.encoding)
    return json_response(body)


async def embed(router: InferenceRouter, request: EmbeddingRequest, deadline_seconds: float
                ) -> tuple[list[Embedding], EmbeddingsFinished]:
    """Every input's vector, in input order, and the node's count."""
    vectors: dict[int, Embedding] = {}
    events = router.embed(request, deadline_seconds=deadline_seconds)
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Embedding):
                vectors[event.index] = event
            elif sorted(vectors) == list(range(len(request.inputs))):
                return [vectors[i] for i in range(len(request.inputs))], event
    raise FederationError(ErrorCode.UNAVAILABLE, "the embedding ended early")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
