"""A client channel that follows this process's certificate files on disk.

grpc fixes a channel's client certificate when the channel is made, and the server
checks a client certificate's expiry on every call (``federation.interceptor``): a
process living longer than its certificate would start failing even though ``federation
pki renew`` gave it a new one. :class:`RenewingChannel` looks at the files (at most
once a second, at a call); when they changed, the next calls go through a new channel
presenting the new certificate, while calls already running finish on the old one,
which is closed once the last of them ends. Stubs keep working: their multicallables
are bound to the renewing channel, not to one generation of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from federation.credentials import CertificateWatch, LoadedCertificate
from federation.periodic import TaskSet
from federation.pki import CertificateFiles, PKIError

log = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 1.0
"""How often a busy channel looks at its files: three ``stat`` calls per second at most."""

ChannelFactory = Callable[[grpc.ChannelCredentials], grpc.aio.Channel]


class _Generation:
    """One underlying channel and how many calls are still running on it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.running = 0
        self.retired = False
        self.closed = False
        self.multicallables: dict[tuple[str, str], Any] = {}

    def call_done(self, _: object) -> None:
        self.running -= 1
        if self.retired and self.running == 0:
            self.close_later()

    def close_later(self) -> None:
        if not self.closed:
            self.closed = True
            _closing.spawn(self.channel.close())


_closing = TaskSet()
"""Closes of retired channels, which no caller waits for."""


class RenewingChannel(grpc.aio.Channel):
    """A ``grpc.aio.Channel`` presenting the identity in ``files`` as it is on disk now."""

    def __init__(self, files: CertificateFiles, factory: ChannelFactory) -> None:
        self._watch = CertificateWatch(files)
        self._factory = factory
        self._current = _Generation(factory(_credentials(self._watch.load())))
        self._retired: list[_Generation] = []
        """Earlier generations whose calls (long-lived streams) still run."""
        self._checked_at = time.monotonic()
        self.renewals = 0

    def _generation(self) -> _Generation:
        now = time.monotonic()
        if now - self._checked_at >= CHECK_INTERVAL_SECONDS:
            self._checked_at = now
            if self._watch.changed():
                self._renew()
        return self._current

    def epoch(self) -> int:
        """How many times the certificate was renewed so far, the files looked at first
        (at most once a second). A long-lived stream keeps the channel, and so the
        certificate, it was opened with: its owner compares this with the epoch the
        stream was opened in, and opens a new stream after a renewal."""
        self._generation()
        return self.renewals

    def _renew(self) -> None:
        try:
            loaded = self._watch.load(replacing=True)
        except (OSError, ValueError, PKIError) as exc:
            log.warning("renewed client certificate not loaded; keeping the previous one",
                        extra={"error": str(exc)[:300]})
            return
        old, self._current = self._current, _Generation(self._factory(_credentials(loaded)))
        old.retired = True
        self.renewals += 1
        self._retired = [g for g in self._retired if not g.closed]
        if old.running == 0:
            old.close_later()
        else:
            self._retired.append(old)

    def _call(self, kind: str, method: str, args: tuple[Any, ...]) -> Callable[..., Any]:
        def invoke(*call_args: Any, **kwargs: Any) -> Any:
            generation = self._generation()
            key = (kind, method)
            if key not in generation.multicallables:
                generation.multicallables[key] = getattr(generation.channel, kind)(method, *args)
            call = generation.multicallables[key](*call_args, **kwargs)
            generation.running += 1
            call.add_done_callback(generation.call_done)
            return call
        return invoke

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self._call("unary_unary", method, _positional(args, kwargs)))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self._call("unary_stream", method, _positional(args, kwargs)))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self._call("stream_unary", method, _positional(args, kwargs)))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Multicallable(self._call("stream_stream", method, _positional(args, kwargs)))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._generation().channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity
                                    ) -> None:
        await self._generation().channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._generation().channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Close every generation still open: a stream opened before a renewal ends
        here too, as it would on a plain channel, instead of outliving its owner."""
        generations = [g for g in (self._current, *self._retired) if not g.closed]
        self._retired.clear()
        for generation in generations:
            generation.closed = True
        await asyncio.gather(*(g.channel.close(grace) for g in generations))

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close(None)


class _Multicallable:
    """Stands for all four multicallable kinds: each call goes to the current channel."""

    def __init__(self, invoke: Callable[..., Any]) -> None:
        self._invoke = invoke

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(*args, **kwargs)


def _positional(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """(request_serializer, response_deserializer, _registered_method) in order."""
    names = ("request_serializer", "response_deserializer", "_registered_method")
    values = list(args) + [None] * (len(names) - len(args))
    for index, name in enumerate(names):
        if name in kwargs:
            values[index] = kwargs[name]
    values[2] = bool(values[2])
    return tuple(values)


def _credentials(loaded: LoadedCertificate) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=loaded.ca_pem, private_key=loaded.key_pem,
        certificate_chain=loaded.chain_pem)
