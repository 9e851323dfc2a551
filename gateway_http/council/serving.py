"""The council as a backend of the one chat pipeline, and its CouncilService calls.

No HTTP here (``routes.py`` has the routes). Models ``council`` and ``council/<sub>``
are answered by :class:`CouncilChatBackend` through ``gateway_http/chat``'s pipeline,
like every model: authenticated with the ``council`` scope, parsed, reserved, audited
before the answer, kept in the tenant's transcript. The last user message is the
question; each vote event becomes progress (an SSE comment while members vote, which
keeps proxies from timing out); the synthesis is the message content, in pieces; an
extra ``council`` object carries decision, confidence, quorum and request id.

Every call is one CouncilService call made with the gateway's identity, carrying the API
key's scopes in ``x-federation-key-scopes`` metadata (the council node trusts that header
from the gateway role only) and the request id in ``x-request-id``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from federation.council.disclosure import BASE_SCOPE, SCOPES_METADATA
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.inference.types import GenerationFinished, GenerationRequest, TokenDelta
from federation.keys.client import KeyPrincipal, KeyVerifier
from federation.logs import REQUEST_ID_HEADER, request_id_var
from federation.v1 import council_pb2, council_pb2_grpc
from gateway_http.chat.protocol import ChatCall, invalid
from gateway_http.chat.serving import Events, Extra, Progress
from gateway_http.council import protocol
from gateway_http.quota import reserve_council


@dataclass
class CouncilGateway:
    """What the handlers need: the CouncilService stub, keys, deadline, sub-councils."""

    stub: council_pb2_grpc.CouncilServiceAsyncStub
    keys: KeyVerifier
    timeout_seconds: float
    councils: Sequence[str]
    """Sub-council names, for the ``council/<name>`` models."""


COUNCIL_GATEWAY = web.AppKey("council_gateway", CouncilGateway)


class CouncilChatBackend:
    """The council's models on ``/v1/chat/completions`` (see ``chat.serving.ChatBackend``)."""

    scope = BASE_SCOPE
    paced = False  # the answer arrives whole, after the vote

    def __init__(self, gateway: CouncilGateway) -> None:
        self._gateway = gateway

    def check(self, call: ChatCall) -> None:
        if call.model not in protocol.council_model_ids(self._gateway.councils):
            raise FederationError(ErrorCode.NOT_FOUND,
                                  f"The model '{call.model}' does not exist", param="model")
        generation = call.generation
        sampling = generation.sampling
        # The members and the chair set their own lengths and sampling, so a cap or a
        # seed the caller relies on could not hold (a max_tokens of 1 still cost the
        # whole vote): refused. temperature and top_p are accepted and have no effect, as
        # clients send them by default.
        for param, unsupported in (("n", len(call.generations) > 1),
                                   ("tools", generation.calls_tools),
                                   ("logprobs", generation.logprobs is not None),
                                   ("response_format",
                                    generation.response_format.type != "text"),
                                   ("max_tokens", sampling.max_tokens is not None),
                                   ("stop", bool(sampling.stop)),
                                   ("seed", sampling.seed is not None)):
            if unsupported:
                raise invalid(param, f"{param} is not supported by the council models.")
        protocol.last_user_message(generation.messages)  # the question, or a 400

    async def reserve(self, request: web.Request, principal: KeyPrincipal, call: ChatCall
                      ) -> int | None:
        await reserve_council(request, self._gateway.keys, principal.key_id,
                              council_of(call.model), 0)
        return None  # the council's model calls carry no budget: the reservation is whole

    def generate(self, generation: GenerationRequest, principal: KeyPrincipal) -> Events:
        vote = council_pb2.VoteRequest(
            question=protocol.last_user_message(generation.messages),
            council=council_of(generation.model), tenant_id=principal.tenant_id,
            level=council_pb2.DISCLOSURE_LEVEL_ANSWER)
        call = self._gateway.stub.Vote(vote, metadata=metadata(principal),
                                       timeout=self._gateway.timeout_seconds)
        return _answer(call, generation.model)


async def _answer(call: Any, model: str) -> AsyncGenerator[Any, None]:
    """Progress while members vote, then the synthesis in pieces, the ``council`` object
    and the usage. The pieces carry the council's usage (its prompt on the first), so a
    stream cut after them is charged what the vote used."""
    try:
        event = await next_event(call)
        while event is not None and not event.HasField("result"):
            yield Progress(protocol.event_json(event))
            event = await next_event(call)
        if event is None:
            raise FederationError(ErrorCode.UNAVAILABLE, "the council ended without a result")
        result = event.result
        usage = result.usage
        for i, piece in enumerate(protocol.pieces(result.answer)):
            yield TokenDelta(piece, usage.completion_tokens if i == 0 else 0,
                             usage.prompt_tokens if i == 0 else None)
        yield Extra({"council": protocol.council_extra(result)})
        yield GenerationFinished("stop", usage.prompt_tokens, usage.completion_tokens, model)
    finally:
        call.cancel()  # a no-op once finished; stops the council's work otherwise


def council_of(model: str) -> str:
    return model.partition("/")[2]


def metadata(principal: KeyPrincipal) -> tuple[tuple[str, str], ...]:
    request_id = request_id_var.get() or "req_" + uuid.uuid4().hex
    return ((SCOPES_METADATA, ",".join(sorted(principal.scopes))),
            (REQUEST_ID_HEADER, request_id))


async def next_event(call: Any) -> council_pb2.VoteResponse | None:
    try:
        event = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    if event is grpc.aio.EOF:
        return None
    assert isinstance(event, council_pb2.VoteResponse)
    return event


def charged(result: council_pb2.CouncilResult) -> GenerationFinished:
    """The vote's usage, as a finished generation (what the lifecycle charges and audits)."""
    return GenerationFinished("stop", result.usage.prompt_tokens,
                              result.usage.completion_tokens, protocol.COUNCIL_MODEL)

