"""One trace per request, across every hop, with the SDK's in-memory exporter.

The whole federation runs in the test process (real nodes over mTLS, real PostgreSQL),
so one tracer provider sees every span: a chat completion is one trace from the
gateway's HTTP span through the key authority, the inference node and the memory node
down to the SQL statements; a council vote adds the council node and its members'
generations. Every server span carries the request id. With tracing off, nothing is
recorded and no trace context travels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from federation.channels import request_id_metadata
from federation.logs import request_id_var
from federation.telemetry import tracing
from tests.council_gateway_support import council_gateway
from tests.db_support import started_database
from tests.stack_support import MODEL, federation_stack


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for the test (requested before any database fixture, so
    that the pools it builds trace their statements)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)
        provider.shutdown()


def the_trace(exporter: InMemorySpanExporter, root_name: str, request_id: str
              ) -> list[ReadableSpan]:
    """Every span of the one trace whose root is the gateway's span of ``request_id``."""
    finished = list(exporter.get_finished_spans())
    roots = [s for s in finished if s.name == root_name and s.parent is None
             and (s.attributes or {}).get(tracing.REQUEST_ID_ATTRIBUTE) == request_id]
    assert len(roots) == 1, [(s.name, s.attributes) for s in finished if s.parent is None]
    trace_id = roots[0].context.trace_id
    return [s for s in finished if s.context.trace_id == trace_id]


def names(trace: list[ReadableSpan]) -> set[str]:
    return {s.name for s in trace}


def assert_connected(trace: list[ReadableSpan]) -> None:
    """One tree: every span's parent is in the trace, except the root's."""
    ids = {s.context.span_id for s in trace}
    orphans = [s.name for s in trace if s.parent is not None and s.parent.span_id not in ids]
    assert orphans == []


async def test_a_chat_completion_is_one_trace_from_the_gateway_to_the_database(
        spans: InMemorySpanExporter, tmp_path: Path, pg_url: str) -> None:
    async with started_database(pg_url) as database, \
            federation_stack(tmp_path, database, pg_url) as stack:
        issued = await stack.issue("t1", ["chat"])
        spans.clear()
        async with stack.http.post(
                stack.base + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {issued.secret}"},
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]},
        ) as response:
            assert response.status == 200, await response.text()
            request_id = response.headers["x-request-id"]
        trace = the_trace(spans, "POST /v1/chat/completions", request_id)
    assert {
        "federation.v1.KeyAuthorityService/VerifyKey",
        "federation.v1.KeyAuthorityService/GrantQuotaLease",  # a key's first request
        "federation.v1.InferenceService/Generate",
        "thermal_memory.stream_batch",
        "thermal_memory.append",
    } <= names(trace), names(trace)
    statements = [s for s in trace if s.name.startswith("db ")]
    assert statements and all((s.attributes or {}).get("db.system") == "postgresql"
                              for s in statements)
    assert any("memory_records" in str((s.attributes or {}).get("db.statement"))
               for s in statements)
    assert any("quota" in str((s.attributes or {}).get("db.statement")) for s in statements)
    assert_connected(trace)
    servers = [s for s in trace if s.name.startswith("federation.v1.")]
    assert {(s.attributes or {}).get(tracing.REQUEST_ID_ATTRIBUTE) for s in servers} \
        == {request_id}


async def test_a_council_vote_is_one_trace_through_council_inference_and_memory(
        spans: InMemorySpanExporter, home: Path, pg_url: str) -> None:
    async with started_database(pg_url) as database, \
            council_gateway(home, database) as gateway:
        import aiohttp

        spans.clear()
        async with aiohttp.ClientSession() as session, session.post(
                gateway.base + "/v1/council/vote",
                headers={"Authorization": f"Bearer {gateway.key}"},
                json={"question": "Should we trace?"}) as response:
            assert response.status == 200, await response.text()
            request_id = response.headers["x-request-id"]
        trace = the_trace(spans, "POST /v1/council/vote", request_id)
    assert {
        "federation.v1.KeyAuthorityService/VerifyKey",
        "federation.v1.CouncilService/VoteUnary",
        "federation.v1.InferenceService/Generate",
        "thermal_memory.stream_batch",
        "thermal_memory.append",
    } <= names(trace), names(trace)
    generations = [s for s in trace if s.name == "federation.v1.InferenceService/Generate"]
    assert len(generations) >= 2  # the members' votes and the chair's synthesis
    assert any(s.name.startswith("db ") for s in trace)
    assert_connected(trace)


def test_off_by_default_nothing_travels() -> None:
    assert not tracing.enabled()
    token = request_id_var.set("req_x")
    try:
        assert request_id_metadata() == (("x-request-id", "req_x"),)
        with tracing.span("nothing") as span:
            assert span is None
        assert tracing.query_logger() is None
    finally:
        request_id_var.reset(token)
