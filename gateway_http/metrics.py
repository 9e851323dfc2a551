"""Prometheus metrics of the gateway, and ``GET /metrics``.

Names follow Prometheus conventions: ``_total`` counters, ``_seconds``
histograms, base units. ``route`` is the matched route pattern (never the raw
path, which would explode cardinality); ``model`` is only set for models the
gateway actually routed, for the same reason.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from federation.telemetry.metrics import LabelledChildren

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60, 120, 300)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.labelled = LabelledChildren()
        """``labelled(metric, *values)``: the hot path's children, kept."""
        self.requests = Counter(
            "federation_gateway_requests_total", "HTTP requests answered.",
            ("route", "model", "status"), registry=registry,
        )
        self.latency = Histogram(
            "federation_gateway_request_duration_seconds",
            "Time from request receipt to the last byte of the response.",
            ("route", "model", "status"), buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "federation_gateway_requests_in_flight", "HTTP requests being served.",
            ("route",), registry=registry,
        )
        self.time_to_first_token = Histogram(
            "federation_gateway_time_to_first_token_seconds",
            "Time from request receipt to the first generated token.",
            ("model",), buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.tokens_per_second = Histogram(
            "federation_gateway_generation_tokens_per_second",
            "Completion tokens per second of generation, per request.",
            ("model",), buckets=_RATE_BUCKETS, registry=registry,
        )
        self.tokens = Counter(
            "federation_gateway_tokens_total", "Tokens processed, by kind.",
            ("model", "kind"), registry=registry,
        )
        self.upstream_errors = Counter(
            "federation_gateway_upstream_errors_total",
            "Requests that failed because an inference node (or backend) failed.",
            ("model", "code"), registry=registry,
        )
        self.stream_errors = Counter(
            "federation_gateway_stream_errors_total",
            "Streams ended by an error after the first byte.",
            ("model", "code"), registry=registry,
        )
        self.background_failures = Counter(
            "federation_gateway_background_failures_total",
            "Audit records or quota charges that could not be written.",
            ("what",), registry=registry,
        )


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """``GET /metrics``: ``registry`` in the Prometheus text format."""
    async def handler(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
