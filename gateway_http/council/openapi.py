"""The council's part of the gateway's OpenAPI document."""

from __future__ import annotations

from typing import Any, Final

from gateway_http.council.protocol import MAX_BODY_QUESTION
from gateway_http.errors import AUTH_STATUSES, BODY_STATUSES, EDGE_STATUSES

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
