"""Token quotas at the gateway: what a request reserves before it runs, and what it is
charged once it ends.

Every generating request reserves first, which also counts it against the request
rate (a request that generates nothing, the vault's, is counted by
``gateway_http/request_rate.py``): at most its prompt plus its completion limit,
capped to what remains. The reservation comes from the gateway's lease of the key's budget
(``federation.keys.lease_book``: no round trip while the lease has room; a new lease,
or an exact one when little remains, in one ``GrantQuotaLease``), or, with leases off,
from one ``ReserveQuota``. It travels to the inference node as the generation's token
budget, which the node enforces. After the response the lifecycle middleware settles it
to what was really used, into its lease (settled once, when the lease ends) or with one
``SettleQuota``:

* a generation that finished: its reported usage;
* a stream cut by the client or by a node failure: the prompt plus the tokens of the
  deltas that arrived (never more than the reservation);
* embeddings: the inputs' tokens, as the node counted them;
* a client that left before the first token: :attr:`QuotaHold.abandoned_charge` (the
  prompt bound for a chat, the whole reservation for the council, whose progress
  carries no token counts);
* anything else (refused, failed before generating): nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from federation.config import CouncilConfig
from federation.council.engine import MAX_ROUNDS
from federation.council.members import Member, load_roster, members_file_for
from federation.errors import ErrorCode, FederationError
from federation.inference.budget import embedding_token_bound, request_prompt_bound
from federation.inference.client import InferenceRouter
from federation.inference.types import EmbeddingRequest, GenerationRequest
from federation.keys.client import KeyReservation, KeyVerifier
from gateway_http.chat.serving import ChatOutcome
from gateway_http.state import STATE

FALLBACK_CONTEXT_LENGTH: Final = 4096
"""Context assumed for a model no inference node describes (it will fail to run)."""

MAX_RESERVATION: Final = 2**53
"""Most tokens one request asks to reserve (far beyond any model's context; keeps an
absurd ``max_tokens`` inside what the key authority accepts)."""

COUNCIL_ATTEMPTS: Final = 2
"""Model calls per member and round, and for the synthesis: the first, and one repair
(see ``federation.council.engine.Council._structured``)."""


@dataclass(frozen=True)
class QuotaHold:
    """A request's reservation and how to charge it if the client leaves early."""

    reservation: KeyReservation
    abandoned_charge: int
    """Tokens charged when the client leaves before any token arrived."""


QUOTA_HOLD = web.RequestKey("quota_hold", QuotaHold)


# ---- generation (chat and text completions) ------------------------------------------------

def generation_reservation_size(generation: GenerationRequest, prompt_bound: int,
                                context_length: int) -> tuple[int, int]:
    """(tokens, min_tokens) to reserve for one generation (one choice).

    ``tokens``: an upper bound of the prompt plus the completion limit (``max_tokens``,
    else the model's context). ``min_tokens``: every message is at least one token, and
    a completion needs one more; the node, which counts the prompt exactly, refuses a
    budget its prompt does not fit.
    """
    completion = generation.sampling.max_tokens or context_length
    tokens = min(prompt_bound + completion, MAX_RESERVATION)
    return tokens, min(tokens, max(1, len(generation.messages)) + 1)


async def reserve_generation(request: web.Request, key_id: str,
                             generations: Sequence[GenerationRequest]) -> KeyReservation:
    """Reserve for a request's generations (its choices, which share the reservation
    equally) and remember it on ``request`` for settlement."""
    state = request.app[STATE]
    info = state.router.model_info(generations[0].model)
    context = info.context_length if info else FALLBACK_CONTEXT_LENGTH
    sizes = [generation_reservation_size(g, request_prompt_bound(g), context)
             for g in generations]
    tokens = min(max(t for t, _ in sizes) * len(sizes), MAX_RESERVATION)
    minimum = min(tokens, max(m for _, m in sizes) * len(sizes))
    reservation = await state.keys.reserve(key_id, tokens=tokens, min_tokens=minimum)
    prompts = sum(request_prompt_bound(g) for g in generations)
    request[QUOTA_HOLD] = QuotaHold(reservation, min(prompts, reservation.tokens))
    return reservation


# ---- embeddings ----------------------------------------------------------------------------

async def reserve_embedding(request: web.Request, key_id: str,
                            embedding: EmbeddingRequest) -> KeyReservation:
    """Reserve an upper bound of the inputs' tokens (the node refuses inputs that need
    more than what was reserved); a client that leaves early is charged nothing: the
    node's count arrives with the vectors or not at all."""
    bound = min(sum(embedding_token_bound(item) for item in embedding.inputs),
                MAX_RESERVATION)
    reservation = await request.app[STATE].keys.reserve(
        key_id, tokens=bound, min_tokens=min(bound, len(embedding.inputs)))
    request[QUOTA_HOLD] = QuotaHold(reservation, 0)
    return reservation


async def refused_by_node(request: web.Request, keys: KeyVerifier,
                          error: FederationError) -> FederationError:
    """The node refused the budget before generating (the prompt does not fit): release
    the reservation now, so the client's next request finds the tokens free, and say
    when the key's quota period resets. Should releasing fail, the settlement after the
    response tries again."""
    hold = request.get(QUOTA_HOLD)
    if error.code is not ErrorCode.INSUFFICIENT_QUOTA or hold is None:
        return error
    if error.retry_after_seconds is None:
        error.retry_after_seconds = hold.reservation.retry_after()
    with contextlib.suppress(FederationError):
        await keys.settle(hold.reservation, 0)
        del request[QUOTA_HOLD]
    return error


# ---- the council ---------------------------------------------------------------------------

def council_token_bound(asked: Sequence[Member], chair: Member, rounds: int,
                        router: InferenceRouter) -> int:
    """The most tokens a council vote can use: every model call it may make, each at most
    its model's context (prompt and completion together never exceed it)."""
    known = [m.context_length for m in router.list_models()]
    fallback = max(known, default=FALLBACK_CONTEXT_LENGTH)

    def context(model: str) -> int:
        info = router.model_info(model)
        return info.context_length if info else fallback

    members = sum(context(m.model) for m in asked) * rounds
    return COUNCIL_ATTEMPTS * (members + context(chair.model))


async def reserve_council(request: web.Request, keys: KeyVerifier, key_id: str, council: str,
                          rounds: int) -> None:
    """Reserve a council vote's worst case in full, or refuse it (the council's model calls
    carry no budget, so a partial reservation could not be enforced).

    The members file is read per vote: a few kilobytes, against a vote that takes seconds,
    and no state to keep on the frozen app."""
    state = request.app[STATE]
    config: CouncilConfig = state.settings.council
    roster = load_roster(members_file_for(state.settings.home, config.members_file))
    asked = roster.select(council)
    bound = council_token_bound(asked, roster.chair, min(rounds or config.rounds, MAX_ROUNDS),
                                state.router)
    reservation = await keys.reserve(key_id, tokens=bound, min_tokens=bound)
    request[QUOTA_HOLD] = QuotaHold(reservation, reservation.tokens)


# ---- settlement ----------------------------------------------------------------------------

def tokens_used(hold: QuotaHold, outcome: ChatOutcome | None, *, client_left: bool) -> int:
    """What to charge a reservation once its request is over (see the module docstring)."""
    if outcome is not None and outcome.finished is not None:
        return outcome.finished.total_tokens
    if outcome is not None and outcome.deltas_seen:
        prompt = hold.abandoned_charge if outcome.prompt_seen is None else outcome.prompt_seen
        return min(prompt + outcome.completion_seen, hold.reservation.tokens)
    return hold.abandoned_charge if client_left else 0
