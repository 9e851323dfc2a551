"""Outgoing mTLS channels between federation nodes: every channel is built here.

Every channel presents the caller's federation certificate, trusts only the
federation CA, and forwards the current request id as ``x-request-id``
metadata so one request can be followed through every node's logs and audit.
:func:`open_channel` is the one builder for callers that may also run without
certificates (``--insecure-dev``); :func:`secure_channel` for those that always
have them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from federation.channel_renewal import RenewingChannel
from federation.config import GrpcConfig
from federation.logs import REQUEST_ID_HEADER, request_id_var
from federation.pki import CertificateFiles
from federation.telemetry import tracing


def grpc_options(config: GrpcConfig) -> list[tuple[str, Any]]:
    """Channel/server options shared by both ends of a federation connection."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Python servers answer pings more frequent than 5 minutes with GOAWAY
        # (too_many_pings); keep the client's keepalive at or above the server's floor.
        ("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect soon after a restarted peer is back (channels only; servers ignore it).
        ("grpc.initial_reconnect_backoff_ms", int(config.reconnect_initial_backoff_seconds * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(config.reconnect_max_backoff_seconds * 1000)),
    ]


def client_credentials(files: CertificateFiles) -> grpc.ChannelCredentials:
    key, cert, ca = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _with_request_id(metadata: Any) -> Any:
    """A call's metadata plus the current request id and (when tracing) trace context,
    where the caller did not set them."""
    request_id = request_id_var.get()
    trace = tracing.trace_metadata()
    if not request_id and not trace:
        return metadata
    pairs = list(metadata or ())
    present = {k for k, _ in pairs}
    pairs += [(k, v) for k, v in trace if k not in present]
    if request_id and REQUEST_ID_HEADER not in present:
        pairs.append((REQUEST_ID_HEADER, request_id))
    return tuple(pairs)


class _RequestIdMulticallable:
    """A multicallable of any kind whose calls carry :func:`_with_request_id`'s metadata."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, request: Any = None, *, metadata: Any = None, **kwargs: Any) -> Any:
        """``request``: the message, or the iterator of messages of a client-streaming
        call (``None`` to write them with ``call.write``)."""
        return self._inner(request, metadata=_with_request_id(metadata), **kwargs)


class RequestIdChannel(grpc.aio.Channel):
    """``channel`` with the current request id (and trace context) added to every call's
    metadata where the caller did not set it.

    Not a client interceptor: grpc.aio runs an intercepted call through an extra task
    and more objects (about 40 us more CPU per unary call, measured: issue 18), paid
    on every call of every node. Attributes it does not define are the wrapped
    channel's (``renewals`` of a :class:`RenewingChannel`)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RequestIdMulticallable(self._channel.unary_unary(method, *args, **kwargs))

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RequestIdMulticallable(self._channel.unary_stream(method, *args, **kwargs))

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RequestIdMulticallable(self._channel.stream_unary(method, *args, **kwargs))

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _RequestIdMulticallable(self._channel.stream_stream(method, *args, **kwargs))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity
                                    ) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def __aenter__(self) -> RequestIdChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close(None)


def channel_epoch(channel: grpc.aio.Channel) -> int:
    """The certificate generation ``channel`` presents now: changes when a renewing
    channel picks up a renewed certificate (see ``RenewingChannel.epoch``); 0 for a
    channel with a fixed certificate."""
    epoch = getattr(channel, "epoch", None)
    return int(epoch()) if callable(epoch) else 0


def request_id_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current request id (and, when tracing, trace context) as call metadata, for
    channels built without interceptors."""
    request_id = request_id_var.get()
    pairs = [*tracing.trace_metadata(), *([(REQUEST_ID_HEADER, request_id)] if request_id
                                         else [])]
    return tuple(pairs) or None


def open_channel(
    target: str,
    credentials: CertificateFiles | None,
    config: GrpcConfig,
    *,
    forward_request_id: bool = True,
) -> grpc.aio.Channel:
    """The channel to a federation node at ``target`` (``host:port``): mTLS as the
    identity in ``credentials``, or plaintext when there are none (only for nodes
    started with ``--insecure-dev``). See :func:`secure_channel` for
    ``forward_request_id``."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=grpc_options(config))
        return RequestIdChannel(channel) if forward_request_id else channel
    return secure_channel(target, credentials, config, forward_request_id=forward_request_id)


def secure_channel(
    target: str,
    files: CertificateFiles,
    config: GrpcConfig,
    *,
    extra_options: Sequence[tuple[str, Any]] = (),
    forward_request_id: bool = True,
) -> grpc.aio.Channel:
    """An mTLS channel to ``target`` (``host:port``) as the identity in ``files``.

    ``forward_request_id=False`` leaves out :class:`RequestIdChannel` (a Python call per
    RPC): such callers pass ``metadata=request_id_metadata()`` themselves.

    The channel follows ``files`` on disk: after a renewal, new calls present the new
    certificate (:class:`~federation.channel_renewal.RenewingChannel`).
    """
    def open_generation(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            target, credentials, options=[*grpc_options(config), *extra_options])

    channel = RenewingChannel(files, open_generation)
    return RequestIdChannel(channel) if forward_request_id else channel
