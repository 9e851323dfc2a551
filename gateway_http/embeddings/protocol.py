"""The OpenAI embeddings wire format: the request, validated into the inference domain's
:class:`EmbeddingRequest`, and the ``list`` of ``embedding`` objects.

``input`` is a string, a list of strings, a list of token ids or a list of such lists
(at most 2,048 inputs, none empty). ``encoding_format`` ``float`` answers JSON numbers;
``base64`` answers each vector's float32 values, little-endian, base64-encoded (what the
``openai`` SDK decodes, and what it asks for by default). ``dimensions`` shortens the
vectors where the model can (``openai`` upstreams, the test backend); others answer 400.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from federation.inference.backend import MAX_EMBEDDING_INPUTS
from federation.inference.types import Embedding, EmbeddingInput, EmbeddingRequest
from gateway_http.chat.protocol import UINT32_MAX, OpenAIBaseModel, invalid, validation_error


class EmbeddingsRequestIn(OpenAIBaseModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    user: str | None = None


_FIELD_NAMES = frozenset(EmbeddingsRequestIn.model_fields)


@dataclass(frozen=True)
class EmbeddingsCall:
    request: EmbeddingRequest
    encoding: Literal["float", "base64"]


def parse_embeddings_request(body: Any, tenant_id: str = "") -> EmbeddingsCall:
    try:
        parsed = EmbeddingsRequestIn.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, _FIELD_NAMES) from None
    inputs = _inputs(parsed.input)
    return EmbeddingsCall(
        EmbeddingRequest(parsed.model, inputs, parsed.dimensions, tenant_id),
        parsed.encoding_format)


def _inputs(value: str | list[str] | list[int] | list[list[int]]) -> tuple[EmbeddingInput, ...]:
    if isinstance(value, str):
        items: list[Any] = [value]
        names = ["input"]
    elif value and all(isinstance(v, int) for v in value):
        items, names = [value], ["input"]
    else:
        items, names = list(value), [f"input[{i}]" for i in range(len(value))]
    if not items:
        raise invalid("input", "The input must not be an empty list.")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise invalid("input", f"At most {MAX_EMBEDDING_INPUTS} inputs are allowed.")
    out: list[EmbeddingInput] = []
    for name, item in zip(names, items, strict=True):
        if not item:
            raise invalid(name, "An input must not be empty.")
        if isinstance(item, list):
            if any(t < 0 or t > UINT32_MAX for t in item):
                raise invalid(name, f"Token ids must be between 0 and {UINT32_MAX}.")
            out.append(tuple(item))
        else:
            out.append(item)
    return tuple(out)


def encoded(values: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return list(values)


def embeddings_object(model: str, vectors: Sequence[Embedding], prompt_tokens: int,
                      encoding: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": v.index,
                  "embedding": encoded(v.values, encoding)} for v in vectors],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
