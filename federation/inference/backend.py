"""The backend interface and the set of backends one inference node hosts.

A backend serves one or more models. ``generate`` is an async iterator of
:class:`TokenDelta` followed by exactly one :class:`GenerationFinished`; ``embed``
one :class:`Embedding` per input followed by one :class:`EmbeddingsFinished`. The
consumer may stop early (``aclose()`` or task cancellation); a backend must
then stop producing promptly and release its slot, because nobody will read
the rest.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Final, Protocol

from federation.config import InferenceConfig, ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit
from federation.inference.tools import check_tools, schema_object
from federation.inference.types import (
    MAX_TOP_LOGPROBS,
    EmbeddingRequest,
    EmbedEvent,
    GenerationEvent,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    SamplingParams,
)

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 2048
"""OpenAI's limit of inputs per embeddings request."""
_SAMPLING_RANGES: Final = (
    # (field, lowest, highest, lowest allowed): SamplingParams' ranges in inference.proto,
    # the same the gateway's OpenAI front enforces.
    ("temperature", 0.0, 2.0, True),
    ("top_p", 0.0, 1.0, False),
    ("repeat_penalty", 0.0, 10.0, False),
    ("presence_penalty", -2.0, 2.0, True),
    ("frequency_penalty", -2.0, 2.0, True),
)


class Backend(Protocol):
    async def start(self) -> None:
        """Load weights / open connections. Called once before any generate."""

    async def stop(self) -> None:
        """Release everything; running generations are abandoned."""

    def models(self) -> Sequence[ModelInfo]:
        """The models this backend serves."""

    def load(self) -> LoadSnapshot:
        """Current load, for routing and GetLoad."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream deltas, then one GenerationFinished. Raises FederationError."""

    def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        """One Embedding per input, then one EmbeddingsFinished. Raises FederationError
        (INVALID_ARGUMENT naming ``model`` for a model that cannot embed)."""


def validate_request(request: GenerationRequest) -> None:
    """Checks every backend relies on; the gateway checks more, with HTTP names."""
    if request.prompt is not None and request.messages:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              "a request has messages or a prompt, not both", param="prompt")
    if request.prompt is None and not request.messages:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "messages must not be empty", param="messages"
        )
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    check_tools(request)
    sampling = request.sampling
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed",
            param="stop",
        )
    _check_sampling_ranges(sampling)
    if sampling.max_tokens is not None and sampling.max_tokens < 1:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "max_tokens must be at least 1", param="max_tokens"
        )
    if request.token_budget is not None:
        completion_limit(request.token_budget, 0, None)  # a budget of 0 leaves nothing
    if request.response_format.type == "json_schema":
        if not request.response_format.json_schema:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                "response_format json_schema needs a schema",
                param="response_format",
            )
        # Every backend parses it (a grammar, an upstream's body): refused here, not as
        # an INTERNAL error of whichever backend trips on it.
        schema_object(request.response_format.json_schema, "response_format",
                      "The response format's json_schema")


def _check_sampling_ranges(sampling: SamplingParams) -> None:
    """A caller of the node other than the gateway (the council, an operator) gets the
    same ranges: llama.cpp takes a NaN or negative temperature without complaint and
    samples nonsense, an upstream answers with its own wording."""
    for name, lowest, highest, lowest_allowed in _SAMPLING_RANGES:
        value = getattr(sampling, name)
        if value is None:
            continue
        above = value >= lowest if lowest_allowed else value > lowest
        if not (above and value <= highest):  # NaN fails both comparisons
            bound = "from" if lowest_allowed else "greater than"
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"{name} must be {bound} {lowest:g} and at most {highest:g}", param=name)


class BackendSet:
    """Every backend of a node, addressed by model id."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = list(backends)
        self._by_model: dict[str, Backend] = {}
        for backend in self._backends:
            for info in backend.models():
                if info.id in self._by_model:
                    raise ValueError(f"model {info.id!r} is configured twice")
                self._by_model[info.id] = backend
        if not self._by_model:
            raise ValueError("an inference node needs at least one model")
        self.default_model = next(iter(self._by_model))

    async def start(self) -> None:
        for backend in self._backends:
            await backend.start()

    async def stop(self) -> None:
        for backend in reversed(self._backends):
            try:
                await backend.stop()
            except Exception:
                # Keep stopping the others: one failed teardown must not leak the rest.
                log.exception("backend stop failed")

    def models(self) -> list[ModelInfo]:
        return [info for backend in self._backends for info in backend.models()]

    def load(self) -> LoadSnapshot:
        loads = [backend.load() for backend in self._backends]
        return LoadSnapshot(
            in_flight=sum(x.in_flight for x in loads),
            queued=sum(x.queued for x in loads),
            capacity=sum(x.capacity for x in loads),
        )

    def backend_for(self, model: str) -> Backend:
        backend = self._by_model.get(model or self.default_model)
        if backend is None:
            raise FederationError(
                ErrorCode.NOT_FOUND, f"model {model!r} is not served here", param="model"
            )
        return backend

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        validate_request(request)
        return self.backend_for(request.model).generate(request)

    def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        validate_embedding(request)
        return self.backend_for(request.model).embed(request)


def validate_embedding(request: EmbeddingRequest) -> None:
    if not request.inputs:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "input must not be empty",
                              param="input")
    if len(request.inputs) > MAX_EMBEDDING_INPUTS:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"at most {MAX_EMBEDDING_INPUTS} inputs are allowed",
                              param="input")
    if request.dimensions is not None and request.dimensions < 1:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "dimensions must be at least 1",
                              param="dimensions")
    if request.token_budget is not None and request.token_budget < 1:
        raise FederationError(ErrorCode.INSUFFICIENT_QUOTA,
                              "the API key's token quota has nothing left for this request")


def build_backend(model: ModelConfig) -> Backend:
    """The backend for one configured model. Heavy imports happen only when used."""
    if model.backend == "test":
        from federation.inference.test_backend import TestBackend

        return TestBackend.from_config(model)
    if model.backend == "openai":
        from federation.inference.openai_upstream import OpenAIUpstreamBackend

        return OpenAIUpstreamBackend(model)
    if model.backend == "llamacpp":
        from federation.inference.llamacpp import LlamaCppBackend

        return LlamaCppBackend(model)
    if model.backend == "council-scripted":
        # Deterministic council members (every one approves) for tests that run the
        # council across processes or hosts, where no test can hand a backend in.
        from federation.council.scripted_backend import ScriptedCouncilBackend

        return ScriptedCouncilBackend(model=model.id)
    raise ValueError(f"model {model.id!r}: unknown backend {model.backend!r}")


def build_backend_set(config: InferenceConfig) -> BackendSet:
    return BackendSet([build_backend(model) for model in config.models])
