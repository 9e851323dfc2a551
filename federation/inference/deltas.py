"""Deltas joined: what a batch of consecutive token deltas says as one.

Used where deltas pile up faster than they are sent: the inference node's coalescer
(deltas produced while the previous message was being sent) and the ``openai``
backend (the events of one network read of the upstream's stream).
"""

from __future__ import annotations

from federation.inference.types import TokenDelta, ToolCallDelta


def joined(deltas: list[TokenDelta]) -> list[TokenDelta]:
    """Consecutive deltas as one (an echoed prompt kept apart from generated text)."""
    groups: list[list[TokenDelta]] = []
    for delta in deltas:
        if groups and groups[-1][0].echo == delta.echo:
            groups[-1].append(delta)
        else:
            groups.append([delta])
    return [join(group) for group in groups]


def join(deltas: list[TokenDelta]) -> TokenDelta:
    if len(deltas) == 1:
        return deltas[0]
    prompt = next((d.prompt_tokens for d in deltas if d.prompt_tokens is not None), None)
    return TokenDelta("".join(d.text for d in deltas), sum(d.tokens for d in deltas), prompt,
                      tool_calls=_joined_calls(deltas),
                      logprobs=tuple(lp for d in deltas for lp in d.logprobs),
                      echo=deltas[0].echo)


def _joined_calls(deltas: list[TokenDelta]) -> tuple[ToolCallDelta, ...]:
    """Tool-call pieces in order; a piece that continues the previous one's call (same
    index, no id of its own) is appended to it."""
    calls: list[ToolCallDelta] = []
    for piece in (c for d in deltas for c in d.tool_calls):
        last = calls[-1] if calls else None
        if last is not None and last.index == piece.index and not piece.id:
            calls[-1] = ToolCallDelta(last.index, last.id, last.name or piece.name,
                                      last.arguments + piece.arguments)
        else:
            calls.append(piece)
    return tuple(calls)
