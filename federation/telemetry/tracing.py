"""Traces: one per request, from the gateway through every node to the database statements.

OpenTelemetry's API and SDK, with thin spans of our own where they matter (the
instrumentation packages would wrap every gRPC message and every aiohttp hook; a
per-token stream would pay for that):

* the gateway's HTTP request (``gateway_http/tracing.py``), continuing a caller's
  W3C ``traceparent`` if it sends one;
* each gRPC call a node serves (the server interceptor), a child of the caller's
  span: every outgoing call carries ``traceparent`` in its metadata
  (``federation/channels.py``);
* each SQL statement (an asyncpg query logger on the pool's connections), and the
  batched audit append, as children of the request whose record it writes.

Every span carries ``federation.request_id``, so a trace is found from the id a
client got in ``x-request-id``. Spans are exported over OTLP/HTTP when
``[tracing] otlp_endpoint`` is set. Off by default, and then nothing is done at all:
no span objects, no context changes, no query logger (``bench/README.md`` has the
measurement).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from federation.config import TracingConfig
from federation.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_ATTRIBUTE = "federation.request_id"
TRACE_HEADERS = ("traceparent", "tracestate")
_RESET_QUERY_MARK = "pg_advisory_unlock_all"
"""asyncpg's reset of a connection released to the pool: not the request's work."""

_tracer: trace.Tracer | None = None
"""``None`` while tracing is off: every function here is then a no-op."""


def enabled() -> bool:
    return _tracer is not None


def configure(config: TracingConfig, component: str) -> Callable[[], None]:
    """Export this process's spans over OTLP if configured; returns the shutdown (which
    flushes what is pending). Nothing happens without ``otlp_endpoint``."""
    if not config.otlp_endpoint:
        return lambda: None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"federation-{component}"}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=config.otlp_endpoint, timeout=config.export_timeout_seconds)))
    use_provider(provider)
    log.info("tracing on", extra={"otlp_endpoint": config.otlp_endpoint,
                                  "sample_ratio": config.sample_ratio})
    return provider.shutdown


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (a test's in-memory exporter); ``None`` turns tracing off."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("federation")


@contextlib.contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL,
         carrier: Mapping[str, str] | None = None,
         attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span | None]:
    """A span around the block (the current one's child, or the remote parent's in
    ``carrier``); ``None`` and no work at all while tracing is off."""
    if _tracer is None:
        yield None
        return
    parent = extract(carrier) if carrier is not None else None
    with _tracer.start_as_current_span(name, context=parent, kind=kind,
                                       attributes=attributes) as current:
        if request_id := request_id_var.get():
            current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
        yield current


def inject_into(carrier: MutableMapping[str, str]) -> None:
    """Add the current trace context (``traceparent``) to outgoing headers or metadata."""
    if _tracer is not None:
        inject(carrier)


def trace_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs (empty while off)."""
    if _tracer is None:
        return []
    carrier: dict[str, str] = {}
    inject(carrier)
    return list(carrier.items())


def current_context() -> otel_context.Context | None:
    """What a batch worker needs to continue a request's trace later (``None`` while off)."""
    return otel_context.get_current() if _tracer is not None else None


@contextlib.contextmanager
def continued(context: otel_context.Context | None) -> Iterator[None]:
    """Run the block as part of the trace ``context`` was taken from."""
    if context is None:
        yield
        return
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def query_logger() -> Callable[[Any], None] | None:
    """An asyncpg query logger making a span of each statement (``None`` while off):
    asyncpg calls it right after the statement, in the caller's context."""
    return _record_query if _tracer is not None else None


def _record_query(record: Any) -> None:
    tracer = _tracer
    if tracer is None or _RESET_QUERY_MARK in record.query:
        return
    if not trace.get_current_span().get_span_context().is_valid:
        return  # background work outside any request: not worth a trace of its own
    end = time.time_ns()
    statement = " ".join(record.query.split())
    current = tracer.start_span(
        "db " + statement.split(" ", 1)[0].rstrip(";").upper(), kind=SpanKind.CLIENT,
        start_time=end - int(record.elapsed * 1e9),
        attributes={"db.system": "postgresql", "db.statement": statement[:500]})
    if request_id := request_id_var.get():
        current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
    if record.exception is not None:
        current.set_status(trace.StatusCode.ERROR, type(record.exception).__name__)
    current.end(end_time=end)
