"""One llama.cpp generation, token by token, in the backend's worker thread.

The loop drives ``Llama.generate`` itself (not ``create_completion``) because it needs
what that hides: the token ids (to count them exactly, and to read each one's log
probability), the prompt as tokens (fill-in-the-middle, token-id prompts, echo), and the
text as it forms (stop sequences held back until they cannot match, tool calls parsed as
they stream). Log probabilities are the model's raw distribution, read before any
sampling step changes it (penalties, grammar, temperature), as vLLM reports them by
default; the alternatives are the likeliest tokens there.
"""

from __future__ import annotations

import codecs
import logging
import random
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit
from federation.inference.grammar import json_schema_grammar, tool_calls_grammar
from federation.inference.tools import TOOL_OPEN, ToolCallParser, prompt_messages
from federation.inference.types import (
    FinishReason,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    TokenDelta,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)

log = logging.getLogger(__name__)

DEFAULTS: Final[dict[str, Any]] = {
    "temp": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "typical_p": 1.0,
    "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
}
"""llama-cpp-python's own defaults for a completion (what ``create_completion`` used)."""


@dataclass
class Model:
    """What a generation needs of the loaded model."""

    llm: Any
    formatter: Any
    model_id: str
    context_length: int
    grammar_cls: Any
    json_gbnf: str


@dataclass
class _Logprobs:
    """Captures the raw distribution of each step (a llama.cpp logits processor)."""

    top: int
    steps: list[tuple[Any, float]] = field(default_factory=list)
    """(logits, log of their normaliser) per sampled token, in order."""

    def __call__(self, _ids: Any, scores: Any) -> Any:
        import numpy as np

        peak = float(scores.max())
        self.steps.append((scores.copy(), peak + float(np.log(np.exp(scores - peak).sum()))))
        return scores

    def of(self, model: Model, step: int, token: int) -> TokenLogprob:
        import numpy as np

        logits, norm = self.steps[step]
        alternatives: list[TopLogprob] = []
        if self.top:
            best = np.argpartition(-logits, self.top)[: self.top]
            for tid in sorted(best, key=lambda t: -logits[t]):
                piece = _piece(model, int(tid))
                alternatives.append(TopLogprob(piece.decode("utf-8", "replace"),
                                               float(logits[tid]) - norm, piece))
        piece = _piece(model, token)
        return TokenLogprob(piece.decode("utf-8", "replace"), float(logits[token]) - norm,
                            piece, tuple(alternatives))


def _piece(model: Model, token: int) -> bytes:
    return bytes(model.llm.detokenize([token], special=True))


# ---- the prompt -----------------------------------------------------------------------------

def prompt_tokens(model: Model, request: GenerationRequest) -> tuple[list[int], str]:
    """The prompt as tokens, and its text (for echo)."""
    llm = model.llm
    prompt = request.prompt
    if prompt is None:
        return chat_prompt_tokens(model, prompt_messages(request))
    if prompt.text is not None:
        tokens = llm.tokenize(prompt.text.encode("utf-8"), add_bos=True, special=True) \
            if prompt.text else [llm.token_bos()]
        text = prompt.text
    else:
        tokens = list(prompt.token_ids)
        vocabulary = llm.n_vocab()
        if not tokens or any(t >= vocabulary for t in tokens):
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "Invalid value for 'prompt': "
                                  f"token ids must be between 0 and {vocabulary - 1}.",
                                  param="prompt")
        text = llm.detokenize(tokens).decode("utf-8", "replace")
    if prompt.suffix:
        tokens = _fill_in_the_middle(model, tokens, prompt.suffix)
    return tokens, text


def chat_prompt_tokens(model: Model, messages: list[dict[str, str]]
                       ) -> tuple[list[int], str]:
    """The chat template's prompt, tokenized so that only the template's own markers can
    be control tokens; and its text.

    Each message's content is tokenized as literal text: a ``<|im_start|>system`` that a
    user typed, or a tool returned, stays text and never opens a turn of its own (as
    OpenAI treats content). The template is rendered with a placeholder for each content,
    so its text holds nothing of the caller's. Tokenizing stops once the prompt outgrows
    the context: a megabyte of messages costs no more than the context's worth of work.
    """
    if sum(1 for message in messages if message["content"]) > model.context_length:
        raise prompt_too_long(model, None, messages=True)  # each is a token at least
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters
    formatted = model.formatter(messages=[{**message, "content": mark}
                                          for message, mark in zip(messages, marks,
                                                                   strict=True)])
    pieces = _split_on_marks(formatted.prompt, marks)
    if pieces is None:  # the template transformed a content (e.g. escaped it): as it was
        whole = model.formatter(messages=messages).prompt
        return model.llm.tokenize(whole.encode("utf-8"), add_bos=not formatted.added_special,
                                  special=True), whole
    tokens: list[int] = []
    for i, piece in enumerate(pieces):
        is_content = i % 2 == 1
        text_piece = messages[i // 2]["content"] if is_content else piece
        if text_piece or i == 0:  # the first piece carries the BOS the model wants
            tokens += model.llm.tokenize(text_piece.encode("utf-8"), special=not is_content,
                                         add_bos=i == 0 and not formatted.added_special)
        if len(tokens) > model.context_length:
            raise prompt_too_long(model, None, messages=True)
    text = "".join(messages[i // 2]["content"] if i % 2 else piece
                   for i, piece in enumerate(pieces))
    return tokens, text


def _split_on_marks(prompt: str, marks: list[str]) -> list[str] | None:
    """``[template, mark 0, template, mark 1, …, template]``, or ``None`` when the marks are
    not each in the prompt once, in order."""
    pieces: list[str] = []
    cursor = 0
    for mark in marks:
        at = prompt.find(mark, cursor)
        if at < 0:
            return None
        pieces += [prompt[cursor:at], mark]
        cursor = at + len(mark)
    pieces.append(prompt[cursor:])
    if any("\ue000" in piece for piece in pieces[::2]):  # a content rendered twice
        return None
    return pieces


def prompt_too_long(model: Model, tokens: int | None, *, messages: bool) -> FederationError:
    """``tokens``: the prompt's length; ``None`` when counting stopped past the context."""
    size = f"{tokens} tokens" if tokens is not None else \
        f"more than {model.context_length} tokens"
    return FederationError(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"the prompt is {size}; model {model.model_id} has a context of "
        f"{model.context_length}", param="messages" if messages else "prompt")


def _fill_in_the_middle(model: Model, prefix: list[int], suffix: str) -> list[int]:
    """``<prefix>…<suffix>…<middle>``: what a model trained for it continues with the
    missing middle (the order llama.cpp's server uses)."""
    vocab = model.llm._model
    pre, suf, mid = vocab.token_prefix(), vocab.token_suffix(), vocab.token_middle()
    if min(pre, suf, mid) < 0:
        raise FederationError(ErrorCode.INVALID_ARGUMENT,
                              f"suffix is not supported: model {model.model_id} has no "
                              "fill-in-the-middle tokens", param="suffix")
    bos = model.llm.token_bos()
    prefix = [t for t in prefix if t != bos]
    after = model.llm.tokenize(suffix.encode("utf-8"), add_bos=False, special=False)
    return [pre, *prefix, suf, *after, mid]


def grammar_text(model: Model, request: GenerationRequest, *, opened: bool = False
                 ) -> str | None:
    """The GBNF the generation must follow: tool calls (after their opening tag when
    ``opened``), a response format, or none."""
    fmt = request.response_format
    if request.calls_tools:
        choice = request.tool_choice
        if choice.mode == "auto" and fmt.type != "text":
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT, "response_format with tools the model may or may "
                f"not call (tool_choice auto) is not supported by model {model.model_id}",
                param="response_format")
        return tool_calls_grammar(request.tools, function=choice.function,
                                  parallel=request.parallel_tool_calls, opened=opened)
    if fmt.type == "json_schema":
        return json_schema_grammar(fmt.json_schema, strict=fmt.strict)
    if fmt.type == "json_object":
        return str(model.json_gbnf)
    return None


# ---- the loop -------------------------------------------------------------------------------

@dataclass
class _Text:
    """Generated text, held back while it may still turn into a stop sequence."""

    stops: list[str]
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(
        "replace"))
    text: str = ""
    sent: int = 0
    stopped: bool = False

    def add(self, piece: bytes) -> str:
        """Append a token's bytes; what may be sent now."""
        self.text += self.decoder.decode(piece)
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops)
                if i >= 0]
        if hits:
            self.stopped = True
            return self._send(min(hits))
        hold = max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                    if self.text.endswith(s[:n])), default=0)
        return self._send(len(self.text) - hold)

    def rest(self) -> str:
        """At the end: what was held back (no stop sequence came)."""
        self.text += self.decoder.decode(b"", final=True)
        return "" if self.stopped else self._send(len(self.text))

    def _send(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


def generate(model: Model, request: GenerationRequest, cancel: threading.Event
             ) -> Iterator[GenerationEvent]:
    """The generation's events; stops early (without a finished event) once ``cancel``
    is set."""
    prompt, prompt_text = prompt_tokens(model, request)
    room = model.context_length - len(prompt)
    if room < 1:
        raise prompt_too_long(model, len(prompt), messages=request.prompt is None)
    limit = completion_limit(request.token_budget, len(prompt),
                             min(request.sampling.max_tokens or room, room))
    assert limit is not None
    echo = request.prompt is not None and request.prompt.echo
    if echo and request.logprobs is not None:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "logprobs of an echoed prompt are "
                              f"not supported by model {model.model_id}", param="echo")
    return _Generation(model, request, prompt, prompt_text, limit, cancel).events()


class _Generation:
    """The token loop of one generation (see the module docstring)."""

    def __init__(self, model: Model, request: GenerationRequest, prompt: list[int],
                 prompt_text: str, limit: int, cancel: threading.Event) -> None:
        self.model, self.request, self.prompt, self.limit = model, request, prompt, limit
        self.prompt_text, self.cancel = prompt_text, cancel
        self.logprobs = _Logprobs(request.logprobs) if request.logprobs is not None else None
        self.text = _Text([s for s in request.sampling.stop if s])
        self.parser = ToolCallParser(forced=True) if request.calls_tools else None
        self.deciding = request.calls_tools and request.tool_choice.mode == "auto"
        """Auto tool choice: the text so far may still become a call."""
        self.held = ""
        self.completion: list[int] = []
        self.reported = 0
        self.first = True
        self.pending_logprobs: list[TokenLogprob] = []
        self.reason: FinishReason = "length"

    def events(self) -> Iterator[GenerationEvent]:
        if self.request.prompt is not None and self.request.prompt.echo:
            self.first = False
            yield TokenDelta(self.prompt_text, 0, len(self.prompt), echo=True)
        grammar = None if self.deciding else _grammar(self.model, self.request)
        opened = yield from self._run(self.prompt, grammar)
        if opened is None:
            return  # cancelled
        if opened:
            # The model began a call: generate it under the calls grammar, after the tag.
            opening = self.model.llm.tokenize(TOOL_OPEN.encode("utf-8"), add_bos=False,
                                              special=True)
            self.completion = opening
            assert self.parser is not None
            self.parser.feed(TOOL_OPEN)
            self.text = _Text(self.text.stops)
            if (yield from self._run(self.prompt + opening,
                                     _grammar(self.model, self.request, opened=True))) is None:
                return
        end = self._end()
        if end is not None:
            yield end
        if self.parser is not None and self.parser.calls and self.reason == "stop" \
                and self.request.tool_choice.mode != "function":
            self.reason = "tool_calls"  # as OpenAI and vLLM: not for a function named
        yield GenerationFinished(self.reason, len(self.prompt), len(self.completion),
                                 self.model.model_id)

    def _run(self, prompt: list[int], grammar: Any
             ) -> Generator[GenerationEvent, None, bool | None]:
        """Sample until the end; ``True`` when the model opened a call (auto tool
        choice), ``None`` when cancelled."""
        import llama_cpp

        llm = self.model.llm
        tokens = llm.generate(prompt, grammar=grammar,
                              logits_processor=[self.logprobs] if self.logprobs else None,
                              **_sampling(llm, self.request))
        try:
            for token in tokens:
                if self.cancel.is_set():
                    return None
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    self.reason = "stop"
                    return False
                if self.logprobs is not None:
                    self.pending_logprobs.append(
                        self.logprobs.of(self.model, len(self.logprobs.steps) - 1, token))
                self.completion.append(token)
                piece = self.text.add(bytes(llm.detokenize(
                    [token], prev_tokens=self.prompt + self.completion[:-1])))
                if self.deciding:
                    piece = self._decide(piece)
                    if self.held.startswith(TOOL_OPEN):
                        return True
                if piece or self.text.stopped:
                    delta = self._delta(piece)
                    if delta is not None:
                        yield delta
                if self.text.stopped:
                    self.reason = "stop"
                    return False
                if len(self.completion) >= self.limit:
                    return False
            return False
        finally:
            tokens.close()

    def _decide(self, piece: str) -> str:
        """Auto tool choice: hold text back while it may become a call's opening tag;
        once it cannot, it is the answer's text (and no call will follow)."""
        self.held += piece
        if self.held.startswith(TOOL_OPEN) or TOOL_OPEN.startswith(self.held):
            return ""
        self.deciding, self.parser = False, None
        piece, self.held = self.held, ""
        return piece

    def _delta(self, piece: str) -> TokenDelta | None:
        content = piece
        calls: tuple[ToolCallDelta, ...] = ()
        if self.parser is not None:
            parsed = self.parser.feed(piece)
            content, calls = parsed.content, tuple(parsed.tool_calls)
        if not content and not calls:
            return None
        return self._emit(content, calls)

    def _emit(self, content: str, calls: tuple[ToolCallDelta, ...]) -> TokenDelta:
        delta = TokenDelta(content, max(0, len(self.completion) - self.reported),
                           len(self.prompt) if self.first else None, tool_calls=calls,
                           logprobs=tuple(self.pending_logprobs))
        self.reported, self.first, self.pending_logprobs = len(self.completion), False, []
        return delta

    def _end(self) -> TokenDelta | None:
        """The last delta: text held back, and the tokens no delta has counted yet."""
        content = self.held + self.text.rest()
        calls: tuple[ToolCallDelta, ...] = ()
        if self.parser is not None and not self.deciding:
            parsed = self.parser.feed(content)
            final = self.parser.finish(cut=self.reason == "length")
            content = parsed.content + final.content
            calls = (*parsed.tool_calls, *final.tool_calls)
        if not content and not calls and len(self.completion) <= self.reported:
            return None
        if not content:
            self.pending_logprobs = []  # tokens of a stop sequence: not part of the answer
        return self._emit(content, calls)


def _grammar(model: Model, request: GenerationRequest, *, opened: bool = False) -> Any:
    text = grammar_text(model, request, opened=opened)
    if text is None:
        return None
    param = "tools" if request.calls_tools else "response_format"
    try:
        grammar = model.grammar_cls.from_string(text, verbose=False)
    except Exception as exc:
        raise _unusable(param) from exc
    if not _compiles(model, grammar):
        raise _unusable(param)
    return grammar


def _compiles(model: Model, grammar: Any) -> bool:
    """Whether llama.cpp accepts the grammar. ``LlamaGrammar.from_string`` only stores
    the text; llama.cpp parses it when sampling starts, and llama-cpp-python does not
    check the result there: a grammar it rejects crashes the process (SIGSEGV). So parse
    it once here, on the same code path, and refuse the request instead."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(
        model.llm._model.vocab, grammar._grammar.encode("utf-8"),
        grammar._root.encode("utf-8"))
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _unusable(param: str) -> FederationError:
    what = "a function's parameters" if param == "tools" else "this JSON schema"
    return FederationError(ErrorCode.INVALID_ARGUMENT,
                           f"{param}: {what} cannot be turned into a grammar", param=param)


def _sampling(llm: Any, request: GenerationRequest) -> dict[str, Any]:
    s = request.sampling
    given = {"temp": s.temperature, "top_p": s.top_p, "repeat_penalty": s.repeat_penalty,
             "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty}
    # As create_completion: a seed makes the sampling reproducible, else a fresh one.
    llm.set_seed(s.seed % 2**32 if s.seed is not None else random.randint(0, 2**31 - 1))
    return {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
