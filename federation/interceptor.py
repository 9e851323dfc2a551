"""The one server interceptor every federation gRPC service runs behind.

For each call it: establishes the caller's identity from the mTLS peer
certificate, enforces the authorization table (PERMISSION_DENIED otherwise),
puts the request id and caller in context variables for logs and handlers,
translates :class:`FederationError` into a status (unknown exceptions become
INTERNAL with a fixed public message), and records RPC metrics.

An aio interceptor only sees the method name and metadata, and the peer's
certificate is only reachable from the servicer context, so the checks run
inside a wrapper around the method handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import importlib.metadata
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from federation import authz
from federation.db.errors import outage_error
from federation.denylist import DenyList
from federation.errors import INTERNAL_MESSAGE, ErrorCode, FederationError
from federation.logs import REQUEST_ID_HEADER, clean_request_id, peer_var, request_id_var
from federation.pki import ChainPolicy, Identity, PKIError, not_after, parse_spiffe_id
from federation.telemetry import tracing
from federation.telemetry.metrics import LabelledChildren

log = logging.getLogger(__name__)

VERSION_HEADER = "x-federation-version"
"""Sent with every gRPC health answer: the version of the federation a node runs."""
_HEALTH_SERVICE = "grpc.health.v1.Health"


def _installed_version() -> str:
    try:
        return importlib.metadata.version("federation")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _installed_version()

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]

caller_var: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("caller", default=None)


_recheck_var: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar(
    "recheck_caller", default=None)
"""The checks of the call being served, bound to its certificate (see ``recheck_caller``)."""


def recheck_caller() -> None:
    """The certificate checks made when the call began, again: for each message of a
    long-lived stream, which (like the connection under it) may outlive the caller's
    certificate or see it denied. Raises UNAUTHENTICATED then."""
    recheck = _recheck_var.get()
    if recheck is not None and (refusal := recheck()) is not None:
        raise FederationError(ErrorCode.UNAUTHENTICATED, refusal)


_interceptor_var: contextvars.ContextVar[FederationServerInterceptor | None] = (
    contextvars.ContextVar("interceptor", default=None))
"""The interceptor of the call being served (see ``CountedOperation``)."""


class CountedOperation:
    """One operation of a stream that carries many (a generation on GenerateStream),
    counted in the RPC series as a call of ``method`` would be: in flight, then handled
    with its status code and timed, so dashboards and alerts see it the same."""

    __slots__ = ("_series", "_started")

    def __init__(self, method: str) -> None:
        interceptor = _interceptor_var.get()
        self._series = None if interceptor is None else interceptor.method_series(method)
        self._started = time.perf_counter()
        if self._series is not None:
            self._series.in_flight.inc()

    def end(self, error: FederationError | None, *, cancelled: bool = False) -> None:
        if self._series is None:
            return
        code = ("CANCELLED" if cancelled else "OK" if error is None
                else error.spec.grpc_status.name)
        self._series.ended(code, self._started)


def current_caller() -> Identity:
    """The authenticated identity of the call being served."""
    caller = caller_var.get()
    if caller is None:
        raise RuntimeError("current_caller() used outside an RPC")
    return caller


class RpcMetrics:
    """Prometheus series for served RPCs, following grpc-prometheus naming."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter(
            "federation_grpc_server_handled",
            "RPCs completed on the server.",
            labels,
            registry=registry,
        )
        self.latency = Histogram(
            "federation_grpc_server_handling_seconds",
            "RPC handling time.",
            ("grpc_service", "grpc_method"),
            registry=registry,
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
            ),
        )
        self.in_flight = Gauge(
            "federation_grpc_server_in_flight",
            "RPCs being served.",
            ("grpc_service", "grpc_method"),
            registry=registry,
        )
        self.denied = Counter(
            "federation_grpc_server_denied",
            "Calls refused by authentication or authorization.",
            ("grpc_service", "grpc_method", "reason"),
            registry=registry,
        )


class _MethodSeries:
    """One method's RPC series, looked up once per method, not at every call."""

    def __init__(self, metrics: RpcMetrics, children: LabelledChildren, service: str,
                 name: str) -> None:
        self.service = service
        self.name = name
        self.in_flight = children(metrics.in_flight, service, name)
        self.latency = children(metrics.latency, service, name)
        self.handled: Callable[[str], Any] = functools.partial(
            children, metrics.handled, service, name)
        """The child of one status code (``handled(code_name)``)."""

    def ended(self, code_name: str, started: float) -> None:
        """A call (or an operation counted as one) that was in flight since ``started``
        ended with status ``code_name``."""
        self.handled(code_name).inc()
        self.latency.observe(time.perf_counter() - started)
        self.in_flight.dec()


class _CallInfo:
    """What the interceptor knows of one call before its handler runs."""

    __slots__ = ("method", "name", "request_id", "series", "service", "trace_parent")

    def __init__(self, method: str, request_id: str, trace_parent: dict[str, str] | None,
                 series: _MethodSeries) -> None:
        self.method = method
        self.service, self.name = series.service, series.name
        self.request_id = request_id
        self.trace_parent = trace_parent
        self.series = series


def identity_from_context(context: Context, trust_domain: str,
                          policy: ChainPolicy | None = None) -> Identity:
    """The caller's SPIFFE identity; exactly one URI SAN is required, the certificate
    must still be valid and (with ``policy``) signed by the intermediate of its kind."""
    return identity_from_auth(context.auth_context(), trust_domain, policy)


def identity_from_auth(auth: Mapping[str, Iterable[bytes]], trust_domain: str,
                       policy: ChainPolicy | None = None) -> Identity:
    """:func:`identity_from_context` of a call's ``auth_context()`` (read once per call:
    each read copies the peer's properties, its certificate's PEM included)."""
    uris = [
        v.decode()
        for v in auth.get("x509_subject_alternative_name", [])
        if v.decode().startswith("spiffe://")
    ]
    if len(uris) != 1:
        raise PKIError(f"peer certificate must carry exactly one SPIFFE URI SAN, has {len(uris)}")
    leaf = _leaf_pem(auth)
    ensure_unexpired(not_after(leaf) if leaf else None)
    identity = parse_spiffe_id(uris[0], trust_domain)
    if policy is not None:
        if leaf is None:
            raise PKIError("the peer's certificate is not available to check its issuer")
        policy.check(identity, leaf)
    return identity


def certificate_not_after(context: Context) -> dt.datetime | None:
    """When the caller's certificate expires (``None`` without one)."""
    leaf = _leaf_pem(context.auth_context())
    return not_after(leaf) if leaf else None


def _leaf_pem(auth: Mapping[str, Iterable[bytes]]) -> bytes | None:
    return next(iter(auth.get("x509_pem_cert", ())), None)


def ensure_unexpired(expiry: dt.datetime | None) -> None:
    """TLS checks validity only at the handshake, and a connection (with every call
    and stream on it) may outlive the certificate it was opened with: a short-lived
    certificate means something only if each call checks it too."""
    if expiry is not None and dt.datetime.now(dt.UTC) >= expiry:
        raise PKIError(f"the client certificate expired at {expiry:%Y-%m-%d %H:%M:%S} UTC; "
                       "renew it and reconnect")


@functools.lru_cache(maxsize=4096)
def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _presented_no_certificate(auth: Mapping[str, Iterable[bytes]]) -> bool:
    """A TLS peer that sent no client certificate (possible only on a port that
    does not require one, i.e. the broker's enrollment port)."""
    return "x509_pem_cert" not in auth


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.rpartition("/")
    return service.lstrip("/"), name


class FederationServerInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate, authorize, contextualise, translate errors, measure."""

    def __init__(self, trust_domain: str, metrics: RpcMetrics, *, insecure_dev: bool = False,
                 policy: ChainPolicy | None = None, deny_list: DenyList | None = None):
        """``policy``: which intermediate may sign which identity (every TLS server has
        one; ``None`` only under ``insecure_dev``)."""
        self._trust_domain = trust_domain
        self._metrics = metrics
        self._insecure_dev = insecure_dev
        self._policy = policy
        self._deny_list = deny_list
        self._series: dict[str, _MethodSeries] = {}
        self._children = LabelledChildren()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        request_id = clean_request_id(_metadata_value(handler_call_details, REQUEST_ID_HEADER))
        trace_parent = _trace_carrier(handler_call_details) if tracing.enabled() else None
        wrapped: Handler = _wrap_handler(
            handler, lambda behavior: self._guard(method, request_id, behavior, trace_parent)
        )
        return wrapped

    def _authenticate(self, auth: Mapping[str, Iterable[bytes]]) -> Identity:
        if self._insecure_dev:
            return Identity(self._trust_domain, "insecure-dev", "admin")
        return identity_from_auth(auth, self._trust_domain, self._policy)

    def _refusal(self, leaf: bytes | None, caller: Identity) -> str | None:
        """Why the deny list refuses the caller's certificate, if it does."""
        if self._deny_list is None or self._insecure_dev or leaf is None:
            return None
        return self._deny_list.refusal(_serial(leaf), caller.spiffe_id)

    def _recheck(self, leaf: bytes | None, caller: Identity) -> str | None:
        """Why the caller's certificate (``leaf``, fixed for the call's connection) is
        refused now (expired, denied), if it is."""
        if self._insecure_dev:
            return None
        try:
            ensure_unexpired(not_after(leaf) if leaf else None)
        except PKIError as exc:
            return str(exc)
        return self._refusal(leaf, caller)

    def method_series(self, method: str) -> _MethodSeries:
        series = self._series.get(method)
        if series is None:
            series = self._series[method] = _MethodSeries(self._metrics, self._children,
                                                          *_split(method))
        return series

    def _guard(self, method: str, request_id: str, behavior: Any,
               trace_parent: dict[str, str] | None = None) -> Any:
        """The handler's behaviour, wrapped: (streaming, unary). Only these two closures
        are made per call; the rest is methods (a decorated closure per call cost
        ~10 us in ``functools.update_wrapper`` alone)."""
        call = _CallInfo(method, request_id, trace_parent, self.method_series(method))
        served = self._served

        async def unary_result(request: Any, context: Context) -> Any:
            async with served(call, context):
                _refuse_undecodable(request)
                return await behavior(request, context)

        async def stream_result(
            request: Any, context: Context
        ) -> AsyncIterator[Any]:
            async with served(call, context):
                _refuse_undecodable(request)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result

        return stream_result, unary_result

    async def _enter(self, call: _CallInfo, context: Context) -> None:
        method, service, name, metrics = call.method, call.service, call.name, self._metrics
        request_id_var.set(call.request_id)
        auth = context.auth_context()
        if not self._insecure_dev and _presented_no_certificate(auth):
            if method in authz.UNAUTHENTICATED_METHODS:
                caller_var.set(None)
                return
            metrics.denied.labels(service, name, "unauthenticated").inc()
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{method} requires a client certificate"
            )
        try:
            caller = self._authenticate(auth)
        except PKIError as exc:
            metrics.denied.labels(service, name, "unauthenticated").inc()
            log.warning(
                "refused unauthenticated call", extra={"method": method, "reason": str(exc)}
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise  # unreachable: abort raises
        leaf = _leaf_pem(auth)
        refusal = self._refusal(leaf, caller)
        if refusal is not None:
            metrics.denied.labels(service, name, "denied").inc()
            log.warning("refused a denied certificate",
                        extra={"method": method, "caller": caller.spiffe_id,
                               "reason": refusal})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        caller_var.set(caller)
        peer_var.set(caller.spiffe_id)
        _recheck_var.set(functools.partial(self._recheck, leaf, caller))
        _interceptor_var.set(self)
        if service == _HEALTH_SERVICE:
            # What `federation status` shows for each node across hosts.
            await context.send_initial_metadata(((VERSION_HEADER, VERSION),))
        if not authz.is_allowed(caller.role, method):
            metrics.denied.labels(service, name, "permission_denied").inc()
            log.warning(
                "permission denied",
                extra={"method": method, "caller": caller.spiffe_id, "role": caller.role},
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {caller.role!r} ({caller.spiffe_id}) may not call {method}",
            )

    @staticmethod
    async def _fail(method: str, exc: BaseException, context: Context) -> None:
        if not isinstance(exc, FederationError):
            outage = outage_error(exc)
            if outage is None:
                log.exception("unhandled error in %s", method, exc_info=exc)
                await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            log.warning("database unavailable in %s", method,
                        extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
            exc = outage
        context.set_trailing_metadata(exc.trailing_metadata())
        await context.abort(exc.spec.grpc_status, exc.message)

    @staticmethod
    def _finish(series: _MethodSeries, started: float, context: Context) -> None:
        code = context.code() if hasattr(context, "code") else None
        series.ended(code.name if isinstance(code, grpc.StatusCode) else "OK", started)

    @contextlib.asynccontextmanager
    async def _served(self, call: _CallInfo, context: Context) -> AsyncIterator[None]:
        """One call, unary or streaming: counted, authenticated and authorized, its
        errors mapped to a status."""
        started = time.perf_counter()
        call.series.in_flight.inc()
        try:
            await self._enter(call, context)
            with tracing.span(call.method.lstrip("/"), kind=SpanKind.SERVER,
                              carrier=call.trace_parent,
                              attributes={"rpc.system": "grpc", "rpc.service": call.service,
                                          "rpc.method": call.name}):
                yield
        except (grpc.aio.AbortError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            await self._fail(call.method, exc, context)
        finally:
            self._finish(call.series, started, context)


def _trace_carrier(details: grpc.HandlerCallDetails) -> dict[str, str]:
    """The caller's trace context (``traceparent``, ``tracestate``) from the metadata."""
    return {str(k): str(v) for k, v in details.invocation_metadata or ()
            if k in tracing.TRACE_HEADERS}


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return str(v)
    return None


class _Undecodable:
    """Stands for a single request message that does not parse (bad UTF-8 in a string,
    a corrupt wire format): the guard refuses it once the caller is authorized."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` answering :class:`_Undecodable` instead of raising: grpc turns a
    raising deserializer into UNKNOWN, with the parser's exception in the details."""
    if deserializer is None:
        return None
    parse = deserializer

    def parsed(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parsed


def _undecodable(reason: str) -> FederationError:
    log.info("refused an undecodable request", extra={"reason": reason[:200]})
    return FederationError(ErrorCode.INVALID_ARGUMENT,
                           "the request message does not parse (a string field that is "
                           "not UTF-8, or a corrupt encoding)")


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise _undecodable(request.reason)


async def _parsed_messages(messages: AsyncIterator[Any], context: Context
                           ) -> AsyncIterator[Any]:
    """The messages of a request stream, as the servicer reads them (the caller was
    authorized before the first one is read). One that does not parse ends the call
    INVALID_ARGUMENT here: raised to the servicer instead, it became INTERNAL (or was
    lost when a servicer reads its stream in a task of its own)."""
    iterator = aiter(messages)
    while True:
        try:
            message = await anext(iterator)
        except StopAsyncIteration:
            return
        except DecodeError as exc:
            error = _undecodable(str(exc))
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.spec.grpc_status, error.message)
        yield message


def _reading(behavior: Any) -> Callable[[AsyncIterator[Any], Context], Any]:
    """``behavior`` of a request stream, reading it through :func:`_parsed_messages`."""
    def read(messages: AsyncIterator[Any], context: Context) -> Any:
        return behavior(_parsed_messages(messages, context), context)
    return read


def _wrap_handler(handler: Handler, guard: Callable[[Any], Any]) -> Any:
    # A single request message is parsed before the handler runs; the messages of a
    # request stream are parsed as the servicer reads them, after the guard's checks.
    if handler.unary_unary:
        _, unary = guard(handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            unary, _tolerant(handler.request_deserializer), handler.response_serializer
        )
    if handler.stream_unary:
        _, unary = guard(_reading(handler.stream_unary))
        return grpc.stream_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        stream, _ = guard(handler.unary_stream)
        return grpc.unary_stream_rpc_method_handler(
            stream, _tolerant(handler.request_deserializer), handler.response_serializer
        )
    stream, _ = guard(_reading(handler.stream_stream))
    return grpc.stream_stream_rpc_method_handler(
        stream, handler.request_deserializer, handler.response_serializer
    )
