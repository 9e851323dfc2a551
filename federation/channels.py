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


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    """The call's metadata plus the current request id and (when tracing) trace context,
    where the caller did not set them."""
    request_id = request_id_var.get()
    metadata = list(details.metadata or ())
    present = {k for k, _ in metadata}
    added = [(k, v) for k, v in tracing.trace_metadata() if k not in present]
    if request_id and REQUEST_ID_HEADER not in present:
        added.append((REQUEST_ID_HEADER, request_id))
    if not added:
        return details
    metadata += added
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


# grpc.aio files each interceptor under the first call kind it implements, so
# one class implementing all four would only ever see unary-unary calls.
class _UnaryUnaryRequestId(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _UnaryStreamRequestId(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _StreamUnaryRequestId(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_request_id(details), requests)


class _StreamStreamRequestId(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Any
    ) -> Any:
        return await continuation(_with_request_id(details), requests)


def _request_id_interceptors() -> list[Any]:
    """Interceptors adding the current request id to every outgoing call that lacks one."""
    return [
        _UnaryUnaryRequestId(),
        _UnaryStreamRequestId(),
        _StreamUnaryRequestId(),
        _StreamStreamRequestId(),
    ]


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
        return grpc.aio.insecure_channel(
            target,
            options=grpc_options(config),
            interceptors=_request_id_interceptors() if forward_request_id else None,
        )
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

    ``forward_request_id=False`` leaves out the interceptors: grpc.aio runs an
    intercepted call through an extra task and wraps every streamed read, a cost
    a per-token hot path should not pay. Such callers pass
    ``metadata=request_id_metadata()`` themselves.
    """
    return grpc.aio.secure_channel(
        target,
        client_credentials(files),
        options=[*grpc_options(config), *extra_options],
        interceptors=_request_id_interceptors() if forward_request_id else None,
    )
