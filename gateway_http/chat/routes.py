"""HTTP routes of chat completions. Only this module knows HTTP; serving does the work."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from gateway_http.auth import CHAT_SCOPE, authenticate
from gateway_http.body import json_body
from gateway_http.chat.protocol import DONE, parse_chat_request
from gateway_http.chat.serving import ChatOutcome
from gateway_http.errors import sse_error
from gateway_http.lifecycle import record_audit_now
from gateway_http.state import MODEL, OUTCOME, PRINCIPAL, STATE

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # reverse proxies must not hold tokens back
}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.perf_counter()
    principal = await authenticate(request, state.keys, CHAT_SCOPE)
    request[PRINCIPAL] = principal
    call = parse_chat_request(json_body(request), principal.tenant_id)
    state.router.check_model(call.generation.model)
    request[MODEL] = call.generation.model
    await state.keys.consume(principal.key_id, tokens=0, is_request=True)
    outcome = request[OUTCOME] = ChatOutcome(started, stream=call.stream)
    result = await state.chat.create(call, outcome)
    if isinstance(result, dict):
        await record_audit_now(request)  # no answer leaves unaudited
        return web.json_response(result, dumps=_dumps)
    return await _stream(request, result, outcome)


async def _stream(request: web.Request, events: AsyncGenerator[bytes, None],
                  outcome: ChatOutcome
                  ) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    # Closing the event iterator cancels the gRPC call, so a client that goes
    # away stops the generation on the inference node.
    async with contextlib.aclosing(events):
        await response.prepare(request)
        try:
            async for data in events:
                if data == DONE and outcome.error is None:
                    data = await _audited_end(request, outcome)
                await response.write(data)
        except ConnectionResetError:
            outcome.error = FederationError(ErrorCode.CANCELLED, "the client went away")
            return response
    await response.write_eof()
    return response


async def _audited_end(request: web.Request, outcome: ChatOutcome) -> bytes:
    """``[DONE]`` once the audit record is durable; an error event first if it is not."""
    try:
        await record_audit_now(request)
    except FederationError as error:
        outcome.error = error
        return sse_error(error) + DONE
    return DONE


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
