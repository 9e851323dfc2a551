"""API-key authentication of HTTP requests.

A request presents its key as ``Authorization: Bearer <key>``; the key
authority's verdict comes through a :class:`~federation.keys.client.KeyVerifier`
(in production the cached gRPC client, see :mod:`gateway_http.key_cache`).
"""

from __future__ import annotations

from aiohttp import web

from federation.errors import ErrorCode, FederationError
from federation.keys import keyformat
from federation.keys.client import KeyPrincipal, KeyVerifier

CHAT_SCOPE = "chat"


def bearer_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise FederationError(
            ErrorCode.UNAUTHENTICATED,
            "Missing API key: send it as 'Authorization: Bearer <key>'",
        )
    key = key.strip()
    if not key.isascii():  # issued keys are ASCII; a stray byte must not reach a hash or a proto
        raise FederationError(ErrorCode.UNAUTHENTICATED, keyformat.MALFORMED)
    return key


async def authenticate(request: web.Request, verifier: KeyVerifier, scope: str) -> KeyPrincipal:
    source = request.remote or ""
    return await verifier.verify(bearer_key(request), scope=scope, source=source)
