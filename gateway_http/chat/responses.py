"""Chat completions as OpenAI returns them: the ``chat.completion`` object and the
``chat.completion.chunk`` stream, tool calls and log probabilities included.

A streamed tool call is written as OpenAI (and vLLM) stream it: its first chunk holds
``index``, ``id``, ``type`` and ``function.name`` (with the arguments' first piece, maybe
empty), later chunks only ``index`` and ``function.arguments`` pieces; the choice ends
with ``finish_reason: "tool_calls"`` (``"stop"`` for a function the caller named, as
OpenAI does). A message that calls tools and says nothing has ``content: null``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from federation.inference.types import GenerationFinished, TokenDelta, TokenLogprob
from gateway_http.chat.serving import ChoiceResult


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage_object(finished: GenerationFinished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.total_tokens,
    }


def logprob_object(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token_bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                              "bytes": list(t.token_bytes)} for t in lp.top]}


def _logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], wanted: bool
              ) -> dict[str, Any] | None:
    if not wanted:
        return None
    return {"content": [logprob_object(lp) for lp in logprobs], "refusal": None}


def completion_object(cid: str, model: str, text: str, finished: GenerationFinished
                      ) -> dict[str, Any]:
    """A one-choice chat completion of plain text."""
    choice = ChoiceResult(text=text, finished=finished)
    return ChatShape(model, logprobs=False, cid=cid).body([choice], finished, {})


class ChatShape:
    """The chat-completions shape of one request (see ``serving.ResponseShape``)."""

    def __init__(self, model: str, *, logprobs: bool, cid: str | None = None,
                 include_usage: bool = False, forced_call: bool = False) -> None:
        """``forced_call``: the answer is a tool call (tool_choice required or a named
        function), so its opening chunk says ``content: null``, as OpenAI's does."""
        self._cid = cid or completion_id()
        self._opening_content: str | None = None if forced_call else ""
        self._model = model
        self._logprobs = logprobs
        self._created = int(time.time())
        self._include_usage = include_usage
        # A text delta's event is these two around its choice: what _event writes,
        # without building and encoding the same dict for every token.
        self._text_head = (
            f'data: {{"id":{json.dumps(self._cid)},"object":"chat.completion.chunk",'
            f'"created":{self._created},"model":{json.dumps(model)},'
            '"system_fingerprint":null,"choices":[{"index":').encode()
        self._text_tail = (
            ',"logprobs":null,"finish_reason":null}]'
            + (',"usage":null' if include_usage else "") + "}\n\n").encode()

    # -- the whole answer ------------------------------------------------------------------

    def body(self, choices: list[ChoiceResult], usage: GenerationFinished,
             extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self._cid,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
            "choices": [self._choice(i, c) for i, c in enumerate(choices)],
            "usage": usage_object(usage),
            **extra,
        }

    def _choice(self, index: int, choice: ChoiceResult) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
            message["content"] = choice.text or None
        assert choice.finished is not None
        return {"index": index, "message": message,
                "logprobs": _logprobs(choice.logprobs, self._logprobs),
                "finish_reason": choice.finished.finish_reason}

    # -- the stream ------------------------------------------------------------------------

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": self._cid, "object": "chat.completion.chunk", "created": self._created,
                 "model": self._model, "system_fingerprint": None, "choices": choices, **extra}
        if self._include_usage and "usage" not in chunk:
            chunk["usage"] = None  # as OpenAI does when include_usage is on
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _delta(self, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: Any = None, **extra: Any) -> bytes:
        return self._event([{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": finish_reason}], **extra)

    def opening(self, index: int) -> bytes:
        return self._delta(index, {"role": "assistant", "content": self._opening_content})

    def delta(self, index: int, delta: TokenDelta) -> bytes | None:
        if not delta.text and not delta.tool_calls and not delta.logprobs:
            return None  # only counted tokens (a stop sequence's, held back)
        if not delta.tool_calls and not delta.logprobs:  # plain text: most tokens
            return b"".join((self._text_head, str(index).encode(), b',"delta":{"content":',
                             json.dumps(delta.text).encode(), b"}", self._text_tail))
        out: dict[str, Any] = {}
        if delta.text or not delta.tool_calls:
            out["content"] = delta.text
        if delta.tool_calls:
            out["tool_calls"] = [
                {"index": c.index, "id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} if c.id else
                {"index": c.index, "function": {"arguments": c.arguments}}
                for c in delta.tool_calls]
        return self._delta(index, out, logprobs=_logprobs(delta.logprobs,
                                                          self._logprobs and bool(
                                                              delta.logprobs)))

    def progress(self, info: dict[str, Any]) -> bytes:
        return (": " + json.dumps(info, separators=(",", ":")) + "\n\n").encode()

    def finish(self, index: int, finished: GenerationFinished, extra: dict[str, Any]
               ) -> bytes:
        return self._delta(index, {}, finished.finish_reason, **extra)

    def usage(self, usage: GenerationFinished) -> bytes:
        return self._event([], usage=usage_object(usage))
