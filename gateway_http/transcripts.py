"""Tenant transcripts: for a tenant that opted in, each chat completion's prompt and answer
are stored as a vault object, encrypted, never in plaintext (issue #7, #4).

How (see docs/guardian.md "Tenant transcripts"):

* ``ChatServing.create`` hands each generation to :func:`tap` (its one hook), whatever
  answers it: a model of the inference nodes or the council. For a tenant
  whose ``tenant_settings.store_transcripts`` is on, ``tap`` reserves a vault object
  *before* generating: a fresh data key split 2-of-3, the guardian's share deposited,
  the client share dropped (none is issued: reading a transcript takes the admin
  recovery path, with a reason, audited and rate-limited by the guardian).
* The events are passed through unchanged while the completion text is collected; when
  the generation finishes, ``{request id, model, messages, completion}`` is sealed under
  that key and stored with the gateway share, and a ``gateway.transcript.store`` record
  (same request id, the object id as subject) is written to thermal memory in the same
  transaction. Only then is the finish event passed on.

Fail closed: the tenant asked for every exchange to be kept, and the issue's rule is that
a failure to record fails the action. Guardian unreachable → the request is refused with
503 before any token is generated; storing fails at the end → the request ends with an
error (503, or an SSE error event instead of the finish chunk when streaming) and the
failure is counted and logged. A request that does not complete leaves no transcript
(its guardian share is destroyed).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from federation.errors import ErrorCode, FederationError
from federation.inference.types import GenerationFinished, GenerationRequest, TokenDelta
from federation.keys.client import KeyPrincipal
from federation.logs import request_id_var
from federation.vault.records import PendingObject
from federation.vault.service import VaultService
from federation.vault.tenants import TenantSettingsReader

log = logging.getLogger(__name__)

ACTION = "gateway.transcript.store"
OBJECT_PREFIX = "vt_"

Events = AsyncGenerator[Any, None]
"""A generation's events: deltas and its finish, maybe a backend's own (council progress),
which pass through untouched."""


class TranscriptRecorder:
    """Stores opted-in tenants' transcripts in the vault; counts what it stored and failed."""

    def __init__(self, vault: VaultService, tenants: TenantSettingsReader) -> None:
        self._vault = vault
        self._tenants = tenants
        self.stored = 0
        self.failures = 0

    async def begin(self, generation: GenerationRequest) -> PendingObject | None:
        """``None`` when the tenant does not store transcripts; else a reserved object."""
        tenant_id = generation.tenant_id
        if not await self._tenants.stores_transcripts(tenant_id):
            return None
        try:
            return await self._vault.reserve_escrowed(tenant_id=tenant_id,
                                                      prefix=OBJECT_PREFIX)
        except FederationError as exc:
            self.failures += 1
            log.warning("transcript reservation failed", extra={"error": exc.message[:200]})
            if exc.code is not ErrorCode.UNAVAILABLE:
                raise
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                "this tenant keeps transcripts of its requests, and the guardian that must "
                "hold a share of each is unavailable: the request was not served",
                retry_after_seconds=exc.retry_after_seconds or 5.0,
            ) from None

    def recorded(self, generation: GenerationRequest, events: Events, pending: PendingObject,
                 actor: str) -> Events:
        return self._recorded(generation, events, pending, actor)

    async def _recorded(self, generation: GenerationRequest, events: Events,
                        pending: PendingObject, actor: str) -> Events:
        parts: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        committed = False
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, TokenDelta):
                        parts.append(event.text)
                        for piece in event.tool_calls:
                            call = calls.setdefault(piece.index, {
                                "id": piece.id, "name": piece.name, "arguments": ""})
                            call["arguments"] += piece.arguments
                    elif isinstance(event, GenerationFinished):
                        await self._commit(generation, "".join(parts),
                                           [calls[i] for i in sorted(calls)], event, pending,
                                           actor)
                        committed = True
                    yield event
        finally:
            if not committed:
                await self._vault.abandon_escrowed(pending, "the request did not complete")

    async def _commit(self, generation: GenerationRequest, completion: str,
                      tool_calls: list[dict[str, str]], finished: GenerationFinished,
                      pending: PendingObject, actor: str) -> None:
        request_id = request_id_var.get()
        document: dict[str, Any] = {
            "object": "chat.transcript", "request_id": request_id, "model": generation.model,
            "tenant_id": generation.tenant_id,
            "messages": [_message(m) for m in generation.messages],
            "completion": completion, "finish_reason": finished.finish_reason,
            "usage": {"prompt_tokens": finished.prompt_tokens,
                      "completion_tokens": finished.completion_tokens},
        }
        if generation.prompt is not None:
            document["prompt"] = generation.prompt.text if generation.prompt.text is not None \
                else list(generation.prompt.token_ids)
        if tool_calls:
            document["tool_calls"] = tool_calls
        try:
            await self._vault.commit_escrowed(
                pending, name=f"transcript/{pending.object_id}",
                value=json.dumps(document, ensure_ascii=False).encode(), actor=actor,
                action=ACTION, attributes={"request_id": request_id, "model": generation.model},
            )
        except Exception as exc:
            self.failures += 1
            log.error("transcript could not be stored",
                      extra={"object_id": pending.object_id, "error": type(exc).__name__})
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                "this tenant keeps transcripts of its requests and this one could not be "
                "stored, so the request failed",
                retry_after_seconds=5.0,
            ) from None
        self.stored += 1


TRANSCRIPTS = web.AppKey("transcripts", TranscriptRecorder)


@dataclass(frozen=True)
class _Session:
    recorder: TranscriptRecorder
    actor: Callable[[], str]


_session: ContextVar[_Session | None] = ContextVar("transcript_session", default=None)


def _message(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments}
                             for c in m.tool_calls]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


async def tap(generation: GenerationRequest, events: Events) -> Events:
    """The hook in ``ChatServing.create``: ``events`` unchanged, or wrapped to store the
    transcript. Raises (503) before generating when an opted-in tenant's transcript
    cannot be reserved. Outside a gateway request with transcripts wired, a no-op."""
    session = _session.get()
    if session is None:
        return events
    try:
        pending = await session.recorder.begin(generation)
    except BaseException:
        await events.aclose()
        raise
    if pending is None:
        return events
    return session.recorder.recorded(generation, events, pending, session.actor())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def transcript_middleware(principal: web.RequestKey[KeyPrincipal]) -> Middleware:
    """Makes the app's :class:`TranscriptRecorder` and the caller's key id visible to
    :func:`tap` for the request being served (a context variable: the chat serving code
    stays free of HTTP)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        recorder = request.app.get(TRANSCRIPTS)
        if recorder is None:
            return await handler(request)

        def actor() -> str:
            caller = request.get(principal)
            return caller.key_id if caller is not None else "gateway"

        token = _session.set(_Session(recorder, actor))
        try:
            return await handler(request)
        finally:
            _session.reset(token)

    return middleware
