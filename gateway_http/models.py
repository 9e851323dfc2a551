"""``GET /v1/models`` and ``GET /v1/models/{model}``: what the inference nodes serve."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from federation.inference.types import ModelInfo
from gateway_http.auth import authenticate
from gateway_http.council.routes import council_model_objects
from gateway_http.state import PRINCIPAL, STATE


def model_object(info: ModelInfo) -> dict[str, Any]:
    # ``created`` is part of OpenAI's schema; models here have no creation date.
    return {"id": info.id, "object": "model", "created": 0, "owned_by": info.owned_by}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[PRINCIPAL] = await authenticate(request, state.keys, scope="")
    models = state.router.list_models()
    data = [model_object(m) for m in models] + council_model_objects(request.app)
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    request[PRINCIPAL] = await authenticate(request, state.keys, scope="")
    wanted = request.match_info["model"]
    for info in state.router.list_models():
        if info.id == wanted:
            return web.json_response(model_object(info))
    for council in council_model_objects(request.app):
        if council["id"] == wanted:
            return web.json_response(council)
    raise FederationError(ErrorCode.NOT_FOUND, f"The model '{wanted}' does not exist",
                          param="model")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
