"""Token budgets: how much of an API key's reserved quota one generation may use.

The gateway reserves tokens before a generation and passes the reservation as the
request's ``token_budget`` (prompt and completion together). Backends that can count
the prompt exactly (llama.cpp, the test backend) use that count; an upstream, which
reports usage only at the end, uses :func:`prompt_token_bound`. Either way the
completion is capped to what the budget leaves, and a prompt that leaves no room for
one completion token is refused with INSUFFICIENT_QUOTA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from federation.errors import ErrorCode, FederationError
from federation.inference.types import ChatMessage, EmbeddingInput, GenerationRequest

MESSAGE_OVERHEAD_TOKENS: Final = 8
"""Tokens a chat template adds around each message (role header, separators)."""

PROMPT_OVERHEAD_TOKENS: Final = 64
"""Tokens a chat template adds once: a default system prompt (SmolLM2 adds one of about
20 tokens when none is given), date lines (Llama 3.1), the generation prompt."""


def prompt_token_bound(messages: Sequence[ChatMessage]) -> int:
    """An upper bound of a prompt's tokens, without a tokenizer.

    Byte-level BPE and SentencePiece (with byte fallback) vocabularies never need more
    than one token per byte of text, plus one for a word-start marker at a segment
    boundary; the template's own tokens are bounded by the overheads above. Real
    counts are far lower (about four bytes per token in English), so this over-reserves
    and never under-counts, except for a template that adds more than the overheads.
    """
    return PROMPT_OVERHEAD_TOKENS + sum(
        len(m.content.encode()) + len(m.name.encode()) + MESSAGE_OVERHEAD_TOKENS
        + len(m.tool_call_id.encode())
        + sum(len(c.id.encode()) + len(c.name.encode()) + len(c.arguments.encode())
              + MESSAGE_OVERHEAD_TOKENS for c in m.tool_calls)
        for m in messages
    )


def request_prompt_bound(request: GenerationRequest) -> int:
    """:func:`prompt_token_bound` of a whole request: the messages, the tools' definitions
    a template writes into the prompt (with instructions of at most
    ``PROMPT_OVERHEAD_TOKENS``), or a raw prompt (no template: its bytes, or its ids)."""
    prompt = request.prompt
    if prompt is not None:
        body = len(prompt.token_ids) if prompt.text is None else len(prompt.text.encode())
        # Fill-in-the-middle adds three tokens and a word-start marker per segment.
        return body + len(prompt.suffix.encode()) + 1 + (4 if prompt.suffix else 0)
    tools = sum(len(t.name.encode()) + len(t.description.encode()) + len(t.parameters.encode())
                + MESSAGE_OVERHEAD_TOKENS for t in request.tools)
    return prompt_token_bound(request.messages) + (
        tools + PROMPT_OVERHEAD_TOKENS if tools else 0)


def embedding_token_bound(item: EmbeddingInput) -> int:
    """An upper bound of one embedding input's tokens (its ids, or a byte each and one
    for a start token)."""
    return len(item) if not isinstance(item, str) else len(item.encode()) + 1


def completion_limit(budget: int | None, prompt_tokens: int, max_tokens: int | None
                     ) -> int | None:
    """``max_tokens`` capped so that prompt and completion fit ``budget``.

    Raises INSUFFICIENT_QUOTA when the prompt leaves no room for one completion token.
    """
    if budget is None:
        return max_tokens
    room = budget - prompt_tokens
    if room < 1:
        raise FederationError(
            ErrorCode.INSUFFICIENT_QUOTA,
            f"the prompt is {prompt_tokens} tokens and the API key's token quota has "
            f"{budget} left for this request: not enough for a completion",
        )
    return room if max_tokens is None else min(max_tokens, room)
