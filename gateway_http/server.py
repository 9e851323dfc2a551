"""The gateway's HTTP server: aiohttp's, with the deadlines and limits of a public edge.

aiohttp (3.14) closes idle kept-alive connections (``keepalive_timeout``) but sets no
deadline on receiving a request: a client that sends half a head or half a body keeps
its connection, and a file descriptor, for as long as it likes (issue 13, finding 5:
about 20,000 of them exhausted the gateway's descriptors and real requests got an
empty reply). Each connection here has:

* a **head deadline** (``gateway.header_read_timeout_seconds``), from the opening of
  the connection, or from the first byte of a kept-alive connection's next request,
  until the parser has the whole head. On expiry the connection is closed, after a
  408 when part of a head had come;
* a **body deadline** (``gateway.body_read_timeout_seconds``), from the head to the
  body's last byte. On expiry the handler's read fails with :class:`BodyReadTimeout`
  (``gateway_http/body.py`` answers 408) and the connection is closed at once, without
  aiohttp's lingering read of the rest;
* the **idle timeout** between requests: aiohttp's own ``keepalive_timeout``
  (``gateway.keepalive_timeout_seconds``);
* a **connection limit** (``gateway.max_connections``): a connection beyond it is
  answered 503 (``Retry-After``) and closed, and :func:`fit_connection_limit` raises
  this process's own soft RLIMIT_NOFILE so the limit fits under it.

The HTTP parser's own refusals (a header too long, a bad Content-Length, a NUL in a
header) are answered in OpenAI's error JSON (``gateway_http/errors.py``) instead of
aiohttp's text/plain; one that comes while a handler waits for the body (a bad chunk)
fails that handler's read at once (400) rather than leaving it to the body deadline.

How: :class:`EdgeRunner` is ``web.AppRunner`` serving through an :class:`EdgeServer`,
a ``web.Server`` whose connections are :class:`EdgeRequestHandler` protocols. The
timers are ``loop.call_later`` handles per connection, cancelled as soon as what they
wait for has arrived, so a well-behaved request costs two timer handles.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web, web_protocol
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

from federation.config import GatewayConfig
from federation.errors import ErrorCode, FederationError
from federation.logs import REQUEST_ID_HEADER, new_request_id
from gateway_http.errors import (
    error_response,
    parser_refusal,
    protocol_error,
    raw_error_response,
)

log = logging.getLogger(__name__)

FD_RESERVE = 256
"""File descriptors kept free beside client connections: gRPC channels, the database
pool, log files, the listening socket, the event loop's own."""

REFUSED_GRACE_SECONDS = 1.0
"""How long a connection refused over the limit may still send its request (read and
dropped) before it is closed: closing with unread data would reset the connection,
and the client would see a reset instead of the 503 already sent."""


class BodyReadTimeout(Exception):
    """The request body did not arrive within ``gateway.body_read_timeout_seconds``."""


@dataclass(frozen=True)
class EdgeLimits:
    """The per-connection deadlines and the connection limit, in effect."""

    header_timeout_seconds: float
    body_timeout_seconds: float
    max_connections: int

    @classmethod
    def from_config(cls, config: GatewayConfig, max_connections: int | None = None
                    ) -> EdgeLimits:
        return cls(config.header_read_timeout_seconds, config.body_read_timeout_seconds,
                   max_connections if max_connections is not None else config.max_connections)


class EdgeRequestHandler(web_protocol.RequestHandler):
    """One client connection: aiohttp's protocol plus the head and body deadlines."""

    def __init__(self, manager: EdgeServer, *, loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._edge = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        """Part of a request head has arrived (a timeout then earns a 408)."""
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False

    # ---- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._edge.full():
            self._refuse(cast(asyncio.Transport, transport))
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timers()
        if self._refused:
            self.transport = None
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped: see REFUSED_GRACE_SECONDS
        if data and not self._receiving_body():
            self._head_started = True
            if self._head_timer is None:
                self._arm_head_timer()  # the first byte of a kept-alive connection's next head
        parsed_before = self._request_count
        super().data_received(data)
        if self._request_count != parsed_before:
            self._head_complete()
        elif self._body is not None and self._body.is_eof():
            self._body_done()

    # ---- deadlines -------------------------------------------------------------------

    def _receiving_body(self) -> bool:
        return self._body is not None and not self._body.is_eof()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._edge.limits.header_timeout_seconds,
                                                 self._head_timed_out)

    def _head_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_started = False
        message, payload = self._messages[-1] if self._messages else (None, None)
        if not isinstance(message, RawRequestMessage):
            # The parser refused what came (a bad chunk, say): a body still being
            # received will not complete, so its handler learns it now, not at the deadline.
            if self._body is not None and not self._body.is_eof():
                error = parser_refusal(getattr(message, "exc", None),
                                       getattr(message, "message", None))
                self._fail_body(self._body, RequestPayloadError(error.message))
            self._body_done()
            return
        self._body_done()
        if payload is not None and not payload.is_eof():
            self._body = payload
            self._body_timer = self._loop.call_later(
                self._edge.limits.body_timeout_seconds, self._body_timed_out)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close:
            return
        if self._request_in_progress:
            return  # a head pipelined behind a running request: the idle timeout follows it
        if self._head_started:
            error = FederationError(ErrorCode.DEADLINE_EXCEEDED,
                                    "The request head did not arrive within the gateway's "
                                    "header read timeout; the connection is closed.")
            self.transport.write(raw_error_response(error, 408))
        # Debug: under a slowloris flood this is one line per connection.
        log.debug("closed a connection whose request head did not arrive in time",
                  extra={"partial_head": self._head_started})
        self.force_close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        body, self._body = self._body, None
        if body is None or body.is_eof() or self.transport is None:
            return
        log.debug("request body did not arrive in time; closing the connection")
        self._fail_body(body, BodyReadTimeout())

    def _fail_body(self, body: StreamReader, exc: Exception) -> None:
        """The handler's read of ``body`` fails with ``exc`` (it answers 408 or 400), and
        the connection closes right after that answer instead of reading on."""
        if self._current_request is None:  # nobody reads it (aiohttp's lingering read)
            self.force_close()
            return
        self._lingering_time = 0.0
        self.close()
        body.set_exception(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # ---- refusals --------------------------------------------------------------------

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Over the connection limit: one 503, then close (after a short grace)."""
        self._refused = True
        self.transport = transport
        self._edge.refused += 1
        error = FederationError(ErrorCode.UNAVAILABLE,
                                "The gateway has too many open connections; retry shortly.",
                                retry_after_seconds=1.0)
        transport.write(raw_error_response(error, 503))
        if transport.can_write_eof():
            transport.write_eof()
        self._head_timer = self._loop.call_later(REFUSED_GRACE_SECONDS, transport.close)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        """What aiohttp answers without the app (the parser's refusals, mostly), in
        OpenAI's error JSON; the connection is closed after it, as aiohttp does."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; it cannot become an error")
        error = protocol_error(status, exc, message)
        if isinstance(exc, HttpProcessingError):
            log.info("refused a malformed HTTP request", extra={"reason": error.message})
        else:
            log.error("request failed outside the app", exc_info=exc)
        response = error_response(error, status)
        response.headers[REQUEST_ID_HEADER] = new_request_id()
        response.force_close()
        return response


class EdgeServer(web.Server):
    """``web.Server`` making :class:`EdgeRequestHandler` connections and counting them."""

    def __init__(self, handler: Any, *, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.refused = 0
        """Connections refused over the limit since start."""
        self._open: set[web_protocol.RequestHandler] = set()

    def __call__(self) -> EdgeRequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def full(self) -> bool:
        return len(self._open) >= self.limits.max_connections

    def connection_made(self, handler: web_protocol.RequestHandler,
                        transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._open.add(handler)

    def connection_lost(self, handler: web_protocol.RequestHandler,
                        exc: BaseException | None = None) -> None:
        self._open.discard(handler)
        super().connection_lost(handler, exc)


class EdgeRunner(web.AppRunner):
    """``web.AppRunner`` (app start-up and clean-up as usual) serving through an
    :class:`EdgeServer`. The runner's keyword arguments reach the server and its
    connections as with ``AppRunner`` (an app's ``handler_args`` are not used)."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app exactly as AppRunner does
        return EdgeServer(plain.request_handler, request_factory=plain.request_factory,
                          limits=self._limits, loop=asyncio.get_running_loop(), **self._kwargs)


def fit_connection_limit(max_connections: int) -> int:
    """The connection limit this process can hold: raises its own soft RLIMIT_NOFILE
    toward its hard limit so ``max_connections`` plus :data:`FD_RESERVE` descriptors
    fit (this process only; no system setting changes). When the hard limit is lower,
    returns a smaller limit that fits, with a warning."""
    needed = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _fits(soft, needed):
        return max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the open-files soft limit", extra={"from": soft, "to": target})
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files soft limit",
                        extra={"wanted": target, "error": str(exc)})
    if _fits(soft, needed):
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning("gateway.max_connections does not fit under the open-files limit; "
                "serving fewer connections (raise the hard limit: ulimit -Hn)",
                extra={"configured": max_connections, "serving": fitted, "limit": soft})
    return fitted


def _fits(soft: int, needed: int) -> bool:
    return soft == resource.RLIM_INFINITY or soft >= needed
