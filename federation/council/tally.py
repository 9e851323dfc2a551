"""Council confidence, the vote tally's decision, and the chair-less fallback synthesis.

The formula (documented in ``docs/council.md``; property-tested in
``tests/test_council_tally.py``). For the votes that count, member ``i`` has
weight ``w_i > 0``, self-reported confidence ``c_i`` in [0, 1] and stance sign
``s_i`` (approve +1, reject -1, abstain 0)::

    S = Σ w_i · c_i · s_i / Σ w_i            (weighted, confidence-scaled support, in [-1, 1])

    decision   = authorized    if S ≥ +1/3
                 blocked       if S ≤ -1/3
                 needs_review  otherwise
    confidence = |S|

``S`` is +1 only when every member approves with full confidence. A rejection
pulls it down by its weight times its confidence, so a confident rejection
lowers the confidence of an approval more than a hesitant one, an abstention
dilutes it, and an even split gives 0 (needs review, no confidence). The
reported confidence is confidence *in the decision*: a unanimous, confident
rejection is a confident block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from federation.council.votes import Decision, Stance, Synthesis, Vote

DECISION_THRESHOLD: Final = 1 / 3
"""|S| needed for a decision other than needs_review (a two-thirds weighted lean)."""


@dataclass(frozen=True)
class WeightedVote:
    member: str
    weight: float
    vote: Vote


def support(votes: Sequence[WeightedVote]) -> float:
    """S: weighted, confidence-scaled net support in [-1, 1]; 0 without votes."""
    total = sum(v.weight for v in votes)
    if total <= 0:
        return 0.0
    net = sum(v.weight * v.vote.confidence * v.vote.stance.sign for v in votes)
    return max(-1.0, min(1.0, net / total))


def tally_decision(score: float) -> Decision:
    if score >= DECISION_THRESHOLD:
        return Decision.AUTHORIZED
    if score <= -DECISION_THRESHOLD:
        return Decision.BLOCKED
    return Decision.NEEDS_REVIEW


def council_confidence(votes: Sequence[WeightedVote]) -> float:
    """Confidence in the tally's decision: |S|."""
    return abs(support(votes))


def reconcile(chair: Decision, tally: Decision) -> tuple[Decision, str]:
    """The chair may agree with the tally or escalate to review, never overrule it.

    Returns the decision to report and, when the chair was overruled, a concern
    saying so (empty otherwise).
    """
    if chair is tally or chair is Decision.NEEDS_REVIEW:
        return chair, ""
    return Decision.NEEDS_REVIEW, (
        f"the chair proposed {chair.value} but the votes support {tally.value}; "
        "a person should decide"
    )


def concerns_union(votes: Sequence[WeightedVote]) -> tuple[str, ...]:
    """Every member's concerns, deduplicated case-insensitively, most frequent first."""
    counts: Counter[str] = Counter()
    first_text: dict[str, str] = {}
    order: dict[str, int] = {}
    for v in votes:
        for concern in v.vote.concerns:
            norm = " ".join(concern.lower().split()).rstrip(".")
            if not norm:
                continue
            counts[norm] += 1
            first_text.setdefault(norm, concern)
            order.setdefault(norm, len(order))
    ranked = sorted(counts, key=lambda k: (-counts[k], order[k]))
    return tuple(first_text[k] for k in ranked)


def fallback_synthesis(votes: Sequence[WeightedVote],
                       why: str = "the chair was unavailable") -> Synthesis:
    """What the council says without its chair: the weighted tally, in words; ``why``
    says what happened to the chair, in the answer the user reads."""
    score = support(votes)
    decision = tally_decision(score)
    by_stance = Counter(v.vote.stance for v in votes)
    counts = ", ".join(
        f"{by_stance[s]} {label}" for s, label in (
            (Stance.APPROVE, "approve"), (Stance.REJECT, "reject"), (Stance.ABSTAIN, "abstain"))
    )
    answer = (
        f"Fallback synthesis ({why}): of {len(votes)} votes, {counts}; "
        f"weighted support {score:+.2f}. Decision: {decision.value}."
    )
    return Synthesis(answer, decision, concerns_union(votes))
