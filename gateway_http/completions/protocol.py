"""The OpenAI text-completions request (``/v1/completions``), validated into the chat
pipeline's call: one generation per choice, each with a raw prompt (no chat template).

``prompt`` is a string, a list of strings, a list of token ids or a list of such lists;
each prompt gets ``n`` choices, indexed prompt by prompt as OpenAI does. ``max_tokens``
defaults to 16, as OpenAI's and vLLM's do. ``logprobs`` (0 to 5) asks for each token's
log probability and that many alternatives; ``echo`` repeats the prompt in the text (not
with logprobs: no backend here computes a prompt's log probabilities); ``suffix`` is
fill-in-the-middle, where the model has the tokens for it.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import Field, ValidationError

from federation.inference.backend import MAX_STOP_SEQUENCES
from federation.inference.types import GenerationRequest, SamplingParams, TextPrompt
from gateway_http.chat.protocol import (
    INT64_MAX,
    INT64_MIN,
    MAX_CHOICES,
    UINT32_MAX,
    ChatCall,
    OpenAIBaseModel,
    StreamOptions,
    invalid,
    validation_error,
    with_choice_seed,
)

DEFAULT_MAX_TOKENS: Final = 16
MAX_LOGPROBS: Final = 5
"""OpenAI's limit for the legacy ``logprobs``."""

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(OpenAIBaseModel):
    model: str = Field(min_length=1, max_length=256)
    prompt: Prompt
    suffix: str | None = None
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    user: str | None = None


_FIELD_NAMES = frozenset(
    (f.alias or name) for model in (CompletionRequest, StreamOptions)
    for name, f in model.model_fields.items())


def parse_completion_request(body: Any, tenant_id: str = "") -> ChatCall:
    """``body``: the parsed JSON body (``None`` when the request had none)."""
    try:
        parsed = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc, _FIELD_NAMES) from None
    _check(parsed)
    n = parsed.n or 1
    generations = tuple(
        with_choice_seed(GenerationRequest(parsed.model, (), _sampling(parsed),
                                           tenant_id=tenant_id, logprobs=parsed.logprobs,
                                           prompt=prompt), choice)
        for prompt in _prompts(parsed) for choice in range(n))
    if len(generations) > MAX_CHOICES:
        raise invalid("prompt", f"At most {MAX_CHOICES} choices (prompts times n) are allowed "
                                "in one request.")
    return ChatCall(generations, bool(parsed.stream),
                    bool(parsed.stream_options and parsed.stream_options.include_usage), n=n)


def _check(req: CompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true.")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise invalid("best_of", "best_of other than n is not supported.")
    if req.logit_bias:
        raise invalid("logit_bias", "logit_bias is not supported.")
    if req.echo and req.logprobs is not None:
        raise invalid("echo", "echo with logprobs is not supported: the prompt's log "
                              "probabilities are not computed.")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.")


def _prompts(req: CompletionRequest) -> list[TextPrompt]:
    suffix, echo = req.suffix or "", bool(req.echo)
    prompt = req.prompt
    if isinstance(prompt, str):
        return [TextPrompt(prompt, (), suffix, echo)]
    if not prompt:
        raise invalid("prompt", "The prompt must not be an empty list.")
    if all(isinstance(p, int) for p in prompt):
        return [_tokens(prompt, "prompt", suffix, echo)]  # type: ignore[arg-type]
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            out.append(TextPrompt(item, (), suffix, echo))
        else:
            out.append(_tokens(item, f"prompt[{i}]", suffix, echo))  # type: ignore[arg-type]
    return out


def _tokens(ids: list[int], param: str, suffix: str, echo: bool) -> TextPrompt:
    if not ids:
        raise invalid(param, "A token prompt must not be empty.")
    if any(t < 0 or t > UINT32_MAX for t in ids):
        raise invalid(param, f"Token ids must be between 0 and {UINT32_MAX}.")
    return TextPrompt(None, tuple(ids), suffix, echo)


def _sampling(req: CompletionRequest) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, stop=stop,
        # An explicit null is the default, as OpenAI and vLLM read it (not "no limit").
        max_tokens=DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
        seed=req.seed, repeat_penalty=req.repeat_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
