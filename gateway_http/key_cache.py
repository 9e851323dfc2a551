"""Key verification results, remembered for a few seconds.

The hot path does not pay a round trip to the key authority per request (refusals
are remembered for less); the price is that a revocation takes up to the TTL to
bite. Quota calls always go through.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from federation.errors import ErrorCode, FederationError
from federation.keys.client import KeyPrincipal, KeyReservation, KeyVerifier

_CACHE_LIMIT = 10_000


class CachedKeyVerifier:
    """Remembers verification results briefly; quota calls always go through.

    A verdict is remembered per (key, scope, source): the key authority suspends a key
    per source after repeated failures, so one source's answer, success or refusal,
    must never answer another source's request.
    """

    def __init__(self, inner: KeyVerifier, ttl: float, negative_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._cache: dict[tuple[bytes, str, str],
                          tuple[float, KeyPrincipal | FederationError]] = {}

    async def verify(self, key: str, *, scope: str, source: str) -> KeyPrincipal:
        # Keyed by a hash so raw secrets do not sit in a long-lived dict.
        slot = (hashlib.sha256(key.encode()).digest(), scope, source)
        now = self._clock()
        cached = self._cache.get(slot)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], FederationError):
                raise cached[1]
            return cached[1]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()  # flooded with distinct keys: forget rather than grow
        try:
            principal = await self._inner.verify(key, scope=scope, source=source)
        except FederationError as exc:
            if exc.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.PERMISSION_DENIED):
                self._cache[slot] = (now + self._negative_ttl, exc)
            raise
        self._cache[slot] = (now + self._ttl, principal)
        return principal

    async def reserve(self, key_id: str, *, tokens: int, min_tokens: int) -> KeyReservation:
        return await self._inner.reserve(key_id, tokens=tokens, min_tokens=min_tokens)

    async def settle(self, reservation: KeyReservation, used_tokens: int) -> None:
        await self._inner.settle(reservation, used_tokens)
