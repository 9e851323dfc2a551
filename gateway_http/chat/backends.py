"""The inference nodes' models as a chat backend (see ``serving.ChatBackend``)."""

from __future__ import annotations

from aiohttp import web

from federation.inference.client import InferenceRouter
from federation.inference.types import GenerationRequest
from federation.keys.client import KeyPrincipal
from gateway_http.auth import CHAT_SCOPE
from gateway_http.chat.protocol import ChatCall
from gateway_http.chat.serving import Events
from gateway_http.quota import reserve_generation


class InferenceChatBackend:
    """The models of the inference nodes, through the router."""

    scope = CHAT_SCOPE
    paced = True

    def __init__(self, router: InferenceRouter, timeout: float) -> None:
        self._router = router
        self._timeout = timeout

    def check(self, call: ChatCall) -> None:
        self._router.check_model(call.model)

    async def reserve(self, request: web.Request, principal: KeyPrincipal, call: ChatCall
                      ) -> int | None:
        reservation = await reserve_generation(request, principal.key_id, call.generations)
        return reservation.token_budget

    def generate(self, generation: GenerationRequest, principal: KeyPrincipal) -> Events:
        return self._router.generate(generation, deadline_seconds=self._timeout)
