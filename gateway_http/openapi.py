"""``GET /openapi.json``: an OpenAPI 3.1 description of the gateway's HTTP API."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway_http.council import openapi as council_openapi
from gateway_http.errors import AUTH_STATUSES, BODY_STATUSES, EDGE_STATUSES

_ERROR = {"$ref": "#/components/responses/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int, auth: bool = True, body: bool = False) -> dict[str, Any]:
    """The error responses of an operation: ``statuses`` of its own, plus what any
    request can meet (``EDGE_STATUSES``), key verification (``auth``) and reading a
    body (``body``)."""
    every = {*statuses, *EDGE_STATUSES, *(AUTH_STATUSES if auth else ()),
             *(BODY_STATUSES if body else ())}
    return {str(s): _ERROR for s in sorted(every)}


_CONTENT = [
    {"type": "string"},
    {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                "properties": {"type": {"const": "text"},
                                               "text": {"type": "string"}}}},
]

_TOOL_CALL = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string", "minLength": 1, "maxLength": 256}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "arguments": {"type": "string", "description": "The arguments object, as JSON "
                      "text."}}}}}

MESSAGE = {"oneOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user"]},
        "content": {"oneOf": _CONTENT}, "name": {"type": "string"}}},
    {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
        "role": {"const": "tool"}, "content": {"oneOf": _CONTENT},
        "tool_call_id": {"type": "string", "minLength": 1, "maxLength": 256,
                         "description": "The id of the call this message answers."}}},
    {"type": "object", "required": ["role"], "description": "Only an assistant message "
     "may come without content (when it called tools).", "properties": {
         "role": {"const": "assistant"},
         "content": {"oneOf": [*_CONTENT, {"type": "null"}]}, "name": {"type": "string"},
         "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
]}

TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "JSON Schema of the arguments. "
                       "The embedded model generates arguments valid against it under a "
                       "grammar, and refuses (400) keywords the grammar cannot enforce."},
        "strict": {"type": "boolean"}}}}}

CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "messages": {"type": "array", "minItems": 1,
                     "items": {"$ref": "#/components/schemas/Message"}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2**32 - 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 2**32 - 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 16, "description": "Choices: "
              "each is a generation of its own, and each is charged."},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
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
                "strict": {"type": "boolean", "description": "Every answer validates: the "
                           "embedded model refuses (400) keywords its grammar cannot "
                           "enforce; without it the schema is followed as far as it can."}}},
        }},
        "tools": {"type": "array", "maxItems": 128,
                  "items": {"$ref": "#/components/schemas/Tool"}},
        "tool_choice": {"oneOf": [
            {"enum": ["none", "auto", "required"]},
            {"type": "object", "required": ["type", "function"], "properties": {
                "type": {"const": "function"},
                "function": {"type": "object", "required": ["name"],
                             "properties": {"name": {"type": "string"}}}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20,
                         "description": "Needs logprobs: true."},
        "user": {"type": "string"},
        # Not implemented, and each would change the answer: only a value that asks for
        # nothing passes; anything else is refused (400) naming the parameter.
        "logit_bias": {"type": "object", "maxProperties": 0},
        "functions": {"type": "array", "maxItems": 0},
        "function_call": {"const": "none"},
        "audio": {"type": "null"},
        "modalities": {"const": ["text"]},
        "web_search_options": {"type": "null"},
    },
}

LOGPROB = {"type": "object", "properties": {
    "token": {"type": "string"}, "logprob": {"type": "number"},
    "bytes": {"type": ["array", "null"], "items": {"type": "integer"}},
    "top_logprobs": {"type": "array", "items": {"type": "object"}}}}

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
                "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                "tool_calls": {"type": "array", "items": _TOOL_CALL}}},
            "logprobs": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
                "content": {"type": "array", "items": LOGPROB}}}]},
            "finish_reason": {"enum": ["stop", "length", "content_filter", "tool_calls"]},
        }}},
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}

_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0,
                                                      "maximum": 2**32 - 1}}

COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "prompt": {"oneOf": [{"type": "string"},
                             {"type": "array", "minItems": 1, "items": {"type": "string"}},
                             _TOKENS, {"type": "array", "minItems": 1, "items": _TOKENS}],
                   "description": "Each prompt gets n choices (at most 16 in all)."},
        "suffix": {"type": "string", "description": "Fill-in-the-middle, where the model "
                   "has the tokens for it (else 400)."},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2**32 - 1, "default": 16},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object",
                           "properties": {"include_usage": {"type": "boolean"}}},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
        "echo": {"type": "boolean", "description": "Not with logprobs."},
        "stop": {"oneOf": [{"type": "string"},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
        "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "user": {"type": "string"},
    },
}

COMPLETION = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"const": "text_completion"},
    "created": {"type": "integer"}, "model": {"type": "string"},
    "choices": {"type": "array", "items": {"type": "object", "properties": {
        "index": {"type": "integer"}, "text": {"type": "string"},
        "logprobs": {"type": ["object", "null"], "properties": {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
            "top_logprobs": {"type": "array", "items": {"type": "object"}},
            "text_offset": {"type": "array", "items": {"type": "integer"}}}},
        "finish_reason": {"enum": ["stop", "length", "content_filter"]}}}},
    "usage": {"$ref": "#/components/schemas/Usage"}}}

EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "input": {"oneOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "maxItems": 2048,
                             "items": {"type": "string", "minLength": 1}},
                            _TOKENS,
                            {"type": "array", "minItems": 1, "maxItems": 2048,
                             "items": _TOKENS}]},
        "encoding_format": {"enum": ["float", "base64"], "default": "float",
                            "description": "base64: each vector's float32 values, "
                                           "little-endian."},
        "dimensions": {"type": "integer", "minimum": 1, "description": "Where the model can "
                       "shorten its vectors (else 400)."},
        "user": {"type": "string"},
    },
}

EMBEDDINGS = {"type": "object", "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer"},
        "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}},
                                {"type": "string"}]}}}},
    "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                               "total_tokens": {"type": "integer"}}}}}

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

MODEL = {"type": "object", "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}


SECRET = {"type": "object", "description": "A vault secret's metadata; never its value or "
                                          "a share.", "properties": {
    "id": {"type": "string"}, "object": {"const": "vault.secret"},
    "tenant_id": {"type": "string"}, "name": {"type": "string"},
    "version": {"type": "integer"}, "state": {"enum": ["active", "destroyed"]},
    "created_by": {"type": "string"}, "created_at": {"type": "integer"},
    "updated_at": {"type": "integer"}, "destroyed_at": {"type": ["integer", "null"]},
    "recoveries": {"type": "integer"}}}

ISSUED = {"allOf": [{"$ref": "#/components/schemas/VaultSecret"}, {"type": "object", "properties": {
    "client_share": {"type": "string", "description": "The client share (`fedshare_...`), "
                                                      "shown once: the federation does not "
                                                      "keep it."}}}]}

_SHARE_HEADER = {"name": "X-Federation-Share", "in": "header", "required": True,
                 "description": "The secret's client share (`fedshare_...`).",
                 "schema": {"type": "string"}}
_SECRET_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_GUARDIAN_DOWN = ("503 when the guardian is unreachable (fail closed: without its share "
                  "there is no recovery path).")


def _vault_paths() -> dict[str, Any]:
    secret = {"$ref": "#/components/schemas/VaultSecret"}
    issued = {"$ref": "#/components/schemas/VaultIssuedShare"}
    body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "maxLength": 200},
            "value": {"type": "string"}, "value_base64": {"type": "string"}}}}}}
    reason = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["reason"],
        "properties": {"reason": {"type": "string", "minLength": 1}}}}}}
    return {
        "/v1/vault/secrets": {
            "post": {"operationId": "createVaultSecret", "security": [{"bearer": []}],
                     "description": "Scope `vault:write`. " + _GUARDIAN_DOWN,
                     "requestBody": body,
                     "responses": {"201": _json(issued, "Created; the client share, once."),
                                   **_errors(409, 429, body=True)}},
            "get": {"operationId": "listVaultSecrets", "security": [{"bearer": []}],
                    "description": "Scope `vault:read`. Metadata of the caller's tenant.",
                    "parameters": [
                        {"name": "page_size", "in": "query", "description": "0 or absent: "
                         "50; at most 1000 are returned.",
                         "schema": {"type": "integer", "minimum": 0}},
                        {"name": "page_token", "in": "query", "description": "The "
                         "`next_page_token` of the previous page.",
                         "schema": {"type": "string"}}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": secret},
                        "next_page_token": {"type": "string"}}}, "Metadata only."),
                        **_errors(429)}},
        },
        "/v1/vault/secrets/{id}": {
            "get": {"operationId": "readVaultSecret", "security": [{"bearer": []}],
                    "description": "Scope `vault:read`. Client + gateway shares open it; the "
                                   "guardian is not involved and may be down.",
                    "parameters": [_SECRET_ID, _SHARE_HEADER],
                    "responses": {"200": _json({"allOf": [secret, {"type": "object",
                                                                    "properties": {
                        "value": {"type": ["string", "null"]},
                        "value_base64": {"type": "string"}}}]}, "The value."),
                        **_errors(404, 409, 429)}},
            "delete": {"operationId": "destroyVaultSecret", "security": [{"bearer": []}],
                       "description": "Scope `vault:write`. Crypto-shredding: irreversible. "
                                      "The reason (printable, at most 1000 characters) in "
                                      "the query or the JSON body.",
                       "parameters": [_SECRET_ID, {"name": "reason", "in": "query",
                                                   "schema": {"type": "string"}}],
                       "requestBody": {"required": False, "content": {"application/json": {
                           "schema": {"type": "object",
                                      "properties": {"reason": {"type": "string"}}}}}},
                       "responses": {"200": _json(secret, "Destroyed."),
                                     **_errors(404, 409, 429, body=True)}},
        },
        "/v1/vault/secrets/{id}/rotate": {"post": {
            "operationId": "rotateVaultSecret", "security": [{"bearer": []}],
            "description": "Scope `vault:write`. New data key and shares. " + _GUARDIAN_DOWN,
            "parameters": [_SECRET_ID, _SHARE_HEADER],
            "responses": {"200": _json(issued, "Rotated; the new client share."),
                          **_errors(404, 409, 429, body=True)}}},
        "/v1/vault/secrets/{id}/recover": {"post": {
            "operationId": "recoverVaultSecret", "security": [{"bearer": []}],
            "description": "Scope `admin`, a non-empty reason. Gateway + guardian shares; "
                           "the guardian audits the release and rate-limits it per tenant "
                           "(429 with Retry-After). The old client share stops working. "
                           + _GUARDIAN_DOWN,
            "parameters": [_SECRET_ID], "requestBody": reason,
            "responses": {"200": _json(issued, "Recovered; a new client share."),
                          **_errors(404, 409, 429, body=True)}}},
    }


def document(*, vault: bool = False, council: bool = False) -> dict[str, Any]:
    """The API description of the routes this gateway serves: ``vault`` (only with a
    database and a guardian) and ``council`` (only with a council node) are optional."""
    doc = _document()
    if council:
        doc["paths"].update(council_openapi.OPENAPI_PATHS)
        doc["components"]["schemas"].update(council_openapi.OPENAPI_SCHEMAS)
    if vault:
        doc["paths"].update(_vault_paths())
        doc["components"]["schemas"].update({"VaultSecret": SECRET,
                                             "VaultIssuedShare": ISSUED})
    return doc


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Federation OpenAI-compatible gateway", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Message": MESSAGE, "Tool": TOOL,
                        "ChatCompletionRequest": CHAT_REQUEST,
                        "ChatCompletion": CHAT_RESPONSE, "Usage": USAGE, "Error": ERROR,
                        "Model": MODEL, "CompletionRequest": COMPLETION_REQUEST,
                        "Completion": COMPLETION, "EmbeddingsRequest": EMBEDDINGS_REQUEST,
                        "Embeddings": EMBEDDINGS},
            "responses": {"Error": _json({"$ref": "#/components/schemas/Error"},
                                         "An OpenAI-style error.")},
        },
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion",
                "description": "Scope `chat` (models of the inference nodes) or `council` "
                               "(the `council` models).",
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
                    **_errors(404, 409, 429, body=True),
                },
            }},
            "/v1/completions": {"post": {
                "operationId": "createCompletion",
                "description": "Scope `chat`. The models of the inference nodes, prompts "
                               "without a chat template.",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": {
                    "200": {"description": "A completion, or with stream=true Server-Sent "
                                           "Events of text_completion objects ending with "
                                           "`data: [DONE]`.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Completion"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(404, 409, 429, body=True),
                },
            }},
            "/v1/embeddings": {"post": {
                "operationId": "createEmbedding",
                "description": "Scope `embeddings`. Usage is charged to the key's token "
                               "quota.",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}}},
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Embeddings"},
                                 "One vector per input, in input order."),
                    **_errors(404, 409, 429, body=True),
                },
            }},
            "/v1/models": {"get": {
                "operationId": "listModels", "security": [{"bearer": []}],
                "responses": {"200": _json({"type": "object", "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
                    "Models served by healthy inference nodes."), **_errors()},
            }},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": [{"bearer": []}],
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Model"}, "The model."),
                              **_errors(404)},
            }},
            "/health": {"get": {"operationId": "health", "responses": {
                **_errors(auth=False),
                "200": _json({"type": "object"}, "Every component serves."),
                "503": {"description": "At least one component is down (the components "
                                       "object), or the gateway is at its connection "
                                       "limit (an error object).",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text exposition.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(auth=False)}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": _json({"type": "object"}, "This document."), **_errors(auth=False)}}},
        },
    }


async def openapi(request: web.Request) -> web.Response:
    served = [r.canonical for r in request.app.router.resources()]
    return web.json_response(document(
        vault=any(path.startswith("/v1/vault/") for path in served),
        council="/v1/council/vote" in served))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
