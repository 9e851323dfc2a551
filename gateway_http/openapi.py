"""``GET /openapi.json``: an OpenAPI 3.1 description of the gateway's HTTP API."""

from __future__ import annotations

from typing import Any

from aiohttp import web

_ERROR = {"$ref": "#/components/responses/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _ERROR for s in statuses}


MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"},
                                                       "text": {"type": "string"}}}},
            {"type": "null"},
        ]},
        "name": {"type": "string"},
    },
}

CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1,
                     "items": {"$ref": "#/components/schemas/Message"}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "n": {"const": 1},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer"},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repeat_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10,
                           "description": "llama.cpp-style repetition penalty (extension)."},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object",
                           "properties": {"include_usage": {"type": "boolean"}}},
        "response_format": {"type": "object", "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {
                "name": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean"}}},
        }},
        "user": {"type": "string"},
    },
}

USAGE = {"type": "object", "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"}}}

CHAT_RESPONSE = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"},
            "message": {"type": "object", "properties": {
                "role": {"const": "assistant"}, "content": {"type": "string"}}},
            "finish_reason": {"enum": ["stop", "length", "content_filter"]},
        }}},
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

MODEL = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Federation OpenAI-compatible gateway", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Message": MESSAGE, "ChatCompletionRequest": CHAT_REQUEST,
                        "ChatCompletion": CHAT_RESPONSE, "Usage": USAGE, "Error": ERROR,
                        "Model": MODEL},
            "responses": {"Error": _json({"$ref": "#/components/schemas/Error"},
                                         "An OpenAI-style error.")},
        },
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "A completion, or with stream=true a Server-Sent "
                                           "Events stream of chat.completion.chunk objects "
                                           "ending with `data: [DONE]`.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(400, 401, 403, 404, 413, 429, 503),
                },
            }},
            "/v1/models": {"get": {
                "operationId": "listModels", "security": [{"bearer": []}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
                    "Models served by healthy inference nodes."), **_errors(401, 403)},
            }},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": [{"bearer": []}],
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Model"}, "The model."),
                              **_errors(401, 403, 404)},
            }},
            "/health": {"get": {"operationId": "health", "responses": {
                "200": _json({"type": "object"}, "Every component serves."),
                "503": _json({"type": "object"}, "At least one component is down.")}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": _json({"type": "object"}, "This document.")}}},
        },
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
