"""Plain domain types of text generation, shared by backends, nodes and the gateway.

No protobuf and no HTTP here: the inference servicer and the gateway convert
at their edges, so every backend sees the same validated request shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")

FinishReason = Literal["stop", "length", "content_filter"]
FormatType = Literal["text", "json_object", "json_schema"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling controls; ``None`` means "the backend's default"."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass(frozen=True)
class ResponseFormat:
    type: FormatType = "text"
    json_schema: str = ""
    """The JSON Schema as JSON text (``json_schema`` type only)."""
    schema_name: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    tenant_id: str = ""
    token_budget: int | None = None
    """Most tokens, prompt and completion together, this generation may use (what was
    reserved against the API key's token quota); ``None``: no budget."""


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int = 1
    """Tokens generated for this text (several when deltas were joined)."""
    prompt_tokens: int | None = None
    """The prompt's tokens, on a generation's first delta only: with the deltas'
    tokens, what a generation cut before its end has used."""


@dataclass(frozen=True)
class GenerationFinished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GenerationEvent = TokenDelta | GenerationFinished
"""What a generation yields: deltas, then exactly one ``GenerationFinished``, last."""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    owned_by: str
    backend: str
    context_length: int


@dataclass(frozen=True)
class LoadSnapshot:
    in_flight: int
    """Generations running now."""
    queued: int
    """Generations admitted and waiting for a slot."""
    capacity: int
    """Most generations that may wait; beyond it requests are refused."""
