"""The gateway's span of each HTTP request: the root of a request's trace (or the child of
a caller's, when it sends a W3C ``traceparent``). Outermost middleware, so the span covers
everything, and a no-op while tracing is off (``federation/telemetry/tracing.py``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from opentelemetry.trace import SpanKind

from federation.telemetry import tracing
from gateway_http.state import REQUEST_ID


@web.middleware
async def tracing_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if not tracing.enabled():
        response: web.StreamResponse = await handler(request)
        return response
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    with tracing.span(f"{request.method} {route}", kind=SpanKind.SERVER,
                      carrier=request.headers,
                      attributes={"http.request.method": request.method,
                                  "http.route": route}) as span:
        try:
            response = await handler(request)
        finally:
            if span is not None and REQUEST_ID in request:
                span.set_attribute(tracing.REQUEST_ID_ATTRIBUTE, request[REQUEST_ID])
        if span is not None:
            span.set_attribute("http.response.status_code", response.status)
        return response
