"""The caller's side of a long-lived stream that carries many operations, each named by
an id the caller chooses (``StreamMemories``' batches, ``GenerateStream``'s
generations): one call, one write at a time, one reader routing each response to its
operation, and every operation still open failed with the stream's error when it ends.
Subclasses say how a response is routed (``_route``) and how the open operations fail
(``_fail_open``). :class:`CurrentStream` is where an owner keeps its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc

from federation.channels import channel_epoch
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.periodic import cancel_and_wait


class MultiplexedCall:
    def __init__(self, call: Any, epoch: int, *, what: str, peer: str) -> None:
        """``what``: the stream, for its errors ("audit stream"); ``peer``: who serves it
        ("memory node")."""
        self._call = call
        self.epoch = epoch
        """The channel's certificate generation when the stream opened (see
        ``channels.channel_epoch``): its owner opens a new stream after a renewal."""
        self._ids = itertools.count(1)
        self._writing = asyncio.Lock()
        self._what = what
        self._peer = peer
        self.ended = False
        # Outside any request's context: the stream outlives the request that opens it
        # (each operation carries its own request id and trace in its message).
        self._reader = asyncio.create_task(self._read(), name=f"{what} reader",
                                           context=contextvars.Context())

    def _route(self, response: Any) -> None:
        raise NotImplementedError

    def _fail_open(self, error: FederationError) -> None:
        raise NotImplementedError

    async def close(self, grace_seconds: float) -> None:
        """End the caller's side; the node ends the stream once its operations are done
        (at most ``grace_seconds``, then it is cancelled)."""
        if not self.ended:
            async with self._writing:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_seconds):
                    await asyncio.shield(self._reader)
        self._end(FederationError(ErrorCode.UNAVAILABLE, f"the {self._what} was closed"))
        await cancel_and_wait(self._reader)

    async def _write(self, message: Any) -> None:
        # One write at a time on a call; a call that has ended refuses it, and its
        # reader fails the operations open on it.
        async with self._writing:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.write(message)

    async def _read(self) -> None:
        ended = FederationError(ErrorCode.UNAVAILABLE, f"the {self._peer} ended the {self._what}")
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                self._route(response)
        except grpc.aio.AioRpcError as exc:
            ended = from_rpc_error(exc)
        finally:
            self._end(ended)

    def _end(self, error: FederationError) -> None:
        """No more operations on this stream; the open ones fail with ``error``."""
        if not self.ended:
            self.ended = True
            self._call.cancel()  # a no-op once the call is done
        self._fail_open(error)


S = TypeVar("S", bound=MultiplexedCall)


class CurrentStream(Generic[S]):
    """The stream an owner writes on: opened when first needed, and again once it has
    ended or the channel has a renewed certificate since it opened (a live stream keeps
    the certificate it was opened with). A replaced stream that has not ended is handed
    to ``retire``, which lets its open operations finish there."""

    def __init__(self, channel: grpc.aio.Channel, open_stream: Callable[[int], S],
                 retire: Callable[[S], object]) -> None:
        """``open_stream``: a new stream, given the channel's epoch (``channel_epoch``)."""
        self._channel = channel
        self._open = open_stream
        self._retire = retire
        self._stream: S | None = None

    def get(self) -> S:
        epoch = channel_epoch(self._channel)
        stream = self._stream
        if stream is not None and not stream.ended and stream.epoch == epoch:
            return stream
        if stream is not None and not stream.ended:
            self._retire(stream)
        self._stream = self._open(epoch)
        return self._stream

    async def close(self, grace_seconds: float) -> None:
        """Close the current stream (see ``MultiplexedCall.close``)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close(grace_seconds)
