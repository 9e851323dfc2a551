"""Plain domain types of text generation, shared by backends, nodes and the gateway.

No protobuf and no HTTP here: the inference servicer and the gateway convert
at their edges, so every backend sees the same validated request shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")

FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]
FormatType = Literal["text", "json_object", "json_schema"]
ToolChoiceMode = Literal["auto", "none", "required", "function"]

MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's limit)."""


@dataclass(frozen=True)
class ToolCall:
    """A complete call of a function by the model, as a conversation's history holds it."""

    id: str
    name: str
    arguments: str
    """The arguments object as JSON text, as the model wrote it."""


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    """The calls an assistant message made."""
    tool_call_id: str = ""
    """The call a tool message answers."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: str = ""
    """The JSON Schema of the arguments object, as JSON text; ``""``: no arguments."""
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode = "auto"
    function: str = ""
    """The function that must be called (mode ``function`` only)."""

    @property
    def forces_call(self) -> bool:
        """The answer must be a tool call (``required``, or a named function)."""
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class TextPrompt:
    """A raw prompt (``/v1/completions``): given to the model as it is, no chat template."""

    text: str | None = None
    """The prompt text; ``None`` when the prompt is ``token_ids``."""
    token_ids: tuple[int, ...] = ()
    suffix: str = ""
    """Fill-in-the-middle: what follows the insertion point."""
    echo: bool = False
    """Repeat the prompt before the completion (as a first delta marked ``echo``)."""


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
    strict: bool = False
    """Every answer must validate: keywords a backend cannot enforce are refused."""


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    """Used only with ``tools``."""
    parallel_tool_calls: bool = True
    logprobs: int | None = None
    """``None``: no log probabilities; N: each token's, with its N likeliest alternatives."""
    prompt: TextPrompt | None = None
    """A raw completion's prompt, instead of ``messages`` (which are then empty)."""

    @property
    def calls_tools(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.tool_choice.mode != "none"


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    token_bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float | None
    """``None`` for the first token of an echoed prompt (nothing predicts it)."""
    token_bytes: bytes
    top: tuple[TopLogprob, ...] = ()
    """The likeliest tokens at this position, likeliest first."""


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call: the first piece of a call has its id and name."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class TokenDelta:
    text: str
    tokens: int = 1
    """Tokens generated for this text (several when deltas were joined)."""
    prompt_tokens: int | None = None
    """The prompt's tokens, on a generation's first delta only: with the deltas'
    tokens, what a generation cut before its end has used."""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    echo: bool = False
    """The prompt, repeated (``TextPrompt.echo``); ``tokens`` is then 0."""


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


EmbeddingInput = str | tuple[int, ...]
"""Text, or token ids of the model's vocabulary."""


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[EmbeddingInput, ...]
    dimensions: int | None = None
    """Length of the vectors, where the model can shorten them; ``None``: its own."""
    tenant_id: str = ""
    token_budget: int | None = None
    """Most tokens the inputs may use together (the API key's reservation)."""


@dataclass(frozen=True)
class Embedding:
    index: int
    """The input's position in the request."""
    values: tuple[float, ...]
    tokens: int


@dataclass(frozen=True)
class EmbeddingsFinished:
    prompt_tokens: int
    model: str = ""


EmbedEvent = Embedding | EmbeddingsFinished
"""What an embedding request yields: one ``Embedding`` per input, then one
``EmbeddingsFinished``, last."""


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
