"""``POST /v1/completions``: scope ``chat`` (a text completion generates on the same
models as a chat, at the same cost), the models of the inference nodes only. Every step
after parsing is the chat pipeline's :func:`~gateway_http.chat.routes.serve`."""

from __future__ import annotations

from aiohttp import web

from gateway_http.body import json_body
from gateway_http.chat.routes import (
    authenticated,
    inference_backend,
    refuse_chat_only_model,
    serve,
)
from gateway_http.completions.protocol import parse_completion_request
from gateway_http.completions.responses import TextShape


async def completions(request: web.Request) -> web.StreamResponse:
    backend = inference_backend(request.app)
    principal = await authenticated(request, backend.scope)
    call = parse_completion_request(json_body(request), principal.tenant_id)
    refuse_chat_only_model(request.app, call.model, "/v1/completions")
    shape = TextShape(call.model, logprobs=call.generation.logprobs is not None,
                      include_usage=call.include_usage)
    return await serve(request, backend, principal, call, shape)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
