"""The request rate of key-authenticated requests that generate nothing (the vault's).

A generating request is counted against its key's requests-per-minute limit by its
reservation (``gateway_http/quota.py``); a request that reserves no tokens is counted
here, before it does its work, with ``ConsumeQuota`` of one request and no tokens: one
round trip to the key authority. Not a reservation, because a reservation needs at least
one token left, and a key whose token quota is spent must still reach its vault.

A spent request rate gets the generation routes' answer: RESOURCE_EXHAUSTED, HTTP 429
``rate_limit_error`` with ``Retry-After`` until the minute's window resets, audited by
the key authority as ``key.quota_exhausted``.
"""

from __future__ import annotations

import grpc

from federation.errors import from_rpc_error
from federation.v1 import key_authority_pb2, key_authority_pb2_grpc


class RequestRate:
    """Counts one request against a key's requests-per-minute limit, or refuses it."""

    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float) -> None:
        self._stub = key_authority_pb2_grpc.KeyAuthorityServiceStub(channel)
        self._timeout = timeout_seconds

    async def count(self, key_id: str) -> None:
        try:
            await self._stub.ConsumeQuota(
                key_authority_pb2.ConsumeQuotaRequest(key_id=key_id, tokens=0,
                                                      is_request=True),
                timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
