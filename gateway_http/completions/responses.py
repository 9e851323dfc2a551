"""Text completions as OpenAI returns them: ``text_completion`` objects, whole or as a
stream of chunks, with the legacy ``logprobs`` shape (parallel lists of tokens, their log
probabilities, their alternatives as ``{token: logprob}`` maps, and each token's
character offset in the choice's text)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from federation.inference.types import GenerationFinished, TokenDelta, TokenLogprob
from gateway_http.chat.responses import usage_object
from gateway_http.chat.serving import ChoiceResult


def _logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int
              ) -> dict[str, Any]:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": offsets}


class TextShape:
    """The text-completions shape of one request (see ``chat.serving.ResponseShape``)."""

    def __init__(self, model: str, *, logprobs: bool, include_usage: bool) -> None:
        self._id = "cmpl-" + uuid.uuid4().hex
        self._model = model
        self._logprobs = logprobs
        self._include_usage = include_usage
        self._created = int(time.time())
        self._offsets: dict[int, int] = {}
        """Characters streamed so far, per choice (for ``text_offset``)."""

    def _object(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self._id, "object": "text_completion", "created": self._created,
                "model": self._model, "system_fingerprint": None, "choices": choices, **extra}

    def body(self, choices: list[ChoiceResult], usage: GenerationFinished,
             extra: dict[str, Any]) -> dict[str, Any]:
        out = []
        for index, choice in enumerate(choices):
            assert choice.finished is not None
            # An echoed prompt comes before the first token with a log probability.
            start = len(choice.text) - sum(len(lp.token) for lp in choice.logprobs)
            out.append({"index": index, "text": choice.text,
                        "logprobs": _logprobs(choice.logprobs, max(0, start))
                        if self._logprobs else None,
                        "finish_reason": choice.finished.finish_reason})
        return self._object(out, usage=usage_object(usage))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = self._object(choices, **extra)
        if self._include_usage and "usage" not in chunk:
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def opening(self, index: int) -> bytes | None:
        return None  # a text completion's first chunk is its first text

    def delta(self, index: int, delta: TokenDelta) -> bytes | None:
        if not delta.text and not delta.logprobs:
            return None
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(delta.text)
        logprobs = _logprobs(delta.logprobs, offset) if self._logprobs else None
        return self._chunk([{"index": index, "text": delta.text, "logprobs": logprobs,
                             "finish_reason": None}])

    def progress(self, info: dict[str, Any]) -> bytes:
        return (": " + json.dumps(info, separators=(",", ":")) + "\n\n").encode()

    def finish(self, index: int, finished: GenerationFinished, extra: dict[str, Any]
               ) -> bytes:
        return self._chunk([{"index": index, "text": "", "logprobs": None,
                             "finish_reason": finished.finish_reason}], **extra)

    def usage(self, usage: GenerationFinished) -> bytes:
        return self._chunk([], usage=usage_object(usage))
