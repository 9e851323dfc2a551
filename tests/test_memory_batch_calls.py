"""The audit client's side of the group commit, through a real memory node over mTLS:
records travel as batches over one StreamMemories stream, concurrent records share a
batch, each caller still gets its own committed record, a bad record fails only its own
caller, and a stream that stops answering (or a node that stops) fails its callers and
gives way to a new stream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import os
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from federation.config import GrpcConfig, Settings
from federation.db import Database
from federation.denylist import DenyList, add_denial
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.logs import request_id_var
from federation.memory import AuditEntry, MemoryRecord
from federation.memory.client import GrpcAuditSink
from federation.memory.restore_event import RESTORE_ACTION
from federation.memory.store import MemoryStore
from federation.server import NodeServer
from federation.tenancy import MAX_TENANT_ID
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc
from nodes import memory as memory_node
from nodes.memory import MAX_REQUEST_ID_CHARS
from nodes.runtime import NodeRuntime
from tests.nodes_support import node
from tests.support import TestPKI


@pytest.fixture
async def memory_channel(pki: TestPKI, database: Database) -> AsyncIterator[grpc.aio.Channel]:
    """A channel, as the gateway, to a real memory node on the test's database."""
    async with node(pki, "memory", Settings(), database, memory_node) as server:
        channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
        try:
            yield channel
        finally:
            await channel.close()


def entry(n: int, action: str = "gateway.request") -> AuditEntry:
    return AuditEntry(actor="key_1", action=action, tenant_id="t1", subject=f"m{n}",
                      attributes={"n": str(n)})


async def as_request(request_id: str, sink: GrpcAuditSink, audit: AuditEntry) -> MemoryRecord:
    """``sink.record`` from inside a request's context (its own request id)."""
    async def record() -> MemoryRecord:
        request_id_var.set(request_id)
        return await sink.record(audit)

    return await asyncio.create_task(record(), context=contextvars.copy_context())


async def test_concurrent_records_share_calls_and_each_caller_gets_its_own(
        memory_channel: grpc.aio.Channel, database: Database) -> None:
    sink = GrpcAuditSink(memory_channel, timeout_seconds=10)
    try:
        alone = await as_request("req_alone", sink, entry(0))  # idle: sent at once
        assert sink.batches == 1 and alone.request_id == "req_alone"
        records = await asyncio.gather(
            *(as_request(f"req_{n}", sink, entry(n)) for n in range(1, 41)))
    finally:
        await sink.close()
    assert sink.batches <= 3, sink.batches  # forty records, not forty calls
    assert [r.request_id for r in records] == [f"req_{n}" for n in range(1, 41)]
    assert [r.subject for r in records] == [f"m{n}" for n in range(1, 41)]
    assert sorted(r.sequence for r in records) == list(range(2, 42))
    store = MemoryStore(database.pool, Settings().memory)
    assert [r.sequence for r in await store.trail("req_17")] == [records[16].sequence]
    report = await store.verify_chain()
    assert report.intact and report.records_checked == 41


async def test_a_malformed_record_fails_only_its_own_caller(
        memory_channel: grpc.aio.Channel) -> None:
    sink = GrpcAuditSink(memory_channel, timeout_seconds=10)
    try:
        outcomes = await asyncio.gather(
            *(sink.record(entry(n, action="" if n == 3 else "gateway.request"))
              for n in range(6)), return_exceptions=True)
    finally:
        await sink.close()
    refused = outcomes.pop(3)
    assert isinstance(refused, FederationError)
    assert refused.code is ErrorCode.INVALID_ARGUMENT and refused.param == "action"
    assert all(isinstance(o, MemoryRecord) for o in outcomes), outcomes


async def test_record_memories_refuses_a_bad_batch_and_stores_none_of_it(
        memory_channel: grpc.aio.Channel, database: Database) -> None:
    stub = pb_grpc.ThermalMemoryServiceStub(memory_channel)
    good = pb.RecordMemoryRequest(action="gateway.request", request_id="req_good")
    cases = {
        "no records": [],
        "over the batch limit": [good] * (Settings().memory.max_batch + 1),
        "a reserved action": [good, pb.RecordMemoryRequest(action=RESTORE_ACTION)],
        "a temperature over 100": [good, pb.RecordMemoryRequest(action="a.b", temperature=101)],
        "a NUL in a subject": [good, pb.RecordMemoryRequest(action="a.b", subject="s\x00")],
        "a blank action": [good, pb.RecordMemoryRequest(action=" \t")],
        "a NUL in an attribute": [good, pb.RecordMemoryRequest(
            action="a.b", payload=pb.AuditPayload(attributes={"k": "v\x00"}))],
    }
    params = {}
    for what, requests in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordMemories(pb.RecordMemoriesRequest(requests=requests), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what
        params[what] = from_rpc_error(refused.value).param
    assert params == {"no records": "requests", "over the batch limit": "requests",
                      "a reserved action": "requests[1].action",
                      "a temperature over 100": "requests[1].temperature",
                      "a NUL in a subject": "requests[1].subject",
                      "a blank action": "requests[1].action",
                      "a NUL in an attribute": "requests[1].payload.attributes['k']"}
    assert await MemoryStore(database.pool, Settings().memory).head() == 0
    written = await stub.RecordMemories(pb.RecordMemoriesRequest(requests=[good, good]),
                                        timeout=10)
    assert [r.sequence for r in written.records] == [1, 2]
    assert {r.request_id for r in written.records} == {"req_good"}


async def test_a_record_postgresql_cannot_store_fails_only_its_own_call(
        memory_channel: grpc.aio.Channel) -> None:
    """A NUL (which text and jsonb columns refuse) is refused before the record joins a
    group commit: the records committed with it are not failed with it."""
    stub = pb_grpc.ThermalMemoryServiceStub(memory_channel)
    bad = [pb.RecordMemoryRequest(action="a.b", tenant_id="t\x00"),
           pb.RecordMemoryRequest(action="a.b", payload=pb.AuditPayload(attributes={"\x00": "v"}))]
    good = [pb.RecordMemoryRequest(action=f"good.{n}") for n in range(12)]
    outcomes = await asyncio.gather(*(stub.RecordMemory(r, timeout=10) for r in bad + good),
                                    return_exceptions=True)
    refused = [from_rpc_error(o) for o in outcomes[:2] if isinstance(o, grpc.aio.AioRpcError)]
    assert [(e.code, e.param) for e in refused] == [
        (ErrorCode.INVALID_ARGUMENT, "tenant_id"),
        (ErrorCode.INVALID_ARGUMENT, "payload.attributes key")]
    assert all(isinstance(o, pb.RecordMemoryResponse) for o in outcomes[2:]), outcomes[2:]


async def test_an_id_too_long_for_its_index_fails_only_its_own_call(
        memory_channel: grpc.aio.Channel, database: Database) -> None:
    """tenant_id and request_id are indexed, and PostgreSQL refuses an index row past
    2704 bytes: such a record failed the group commit it joined, every record sharing it
    UNAVAILABLE. Refused before it joins one; the chain goes on, intact."""
    stub = pb_grpc.ThermalMemoryServiceStub(memory_channel)
    noise = base64.b64encode(os.urandom(3000)).decode()  # incompressible
    bad = [pb.RecordMemoryRequest(action="a.b", tenant_id=noise),
           pb.RecordMemoryRequest(action="a.b", tenant_id="t" * (MAX_TENANT_ID + 1)),
           pb.RecordMemoryRequest(action="a.b", request_id=noise),
           pb.RecordMemoryRequest(action="a.b", request_id="r" * (MAX_REQUEST_ID_CHARS + 1))]
    good = [pb.RecordMemoryRequest(action=f"good.{n}") for n in range(12)]
    outcomes = await asyncio.gather(*(stub.RecordMemory(r, timeout=10) for r in bad + good),
                                    return_exceptions=True)
    refused = [from_rpc_error(o) if isinstance(o, grpc.aio.AioRpcError) else o
               for o in outcomes[:4]]
    assert [(e.code, e.param) for e in refused] == [  # type: ignore[union-attr]
        (ErrorCode.INVALID_ARGUMENT, "tenant_id"), (ErrorCode.INVALID_ARGUMENT, "tenant_id"),
        (ErrorCode.INVALID_ARGUMENT, "request_id"), (ErrorCode.INVALID_ARGUMENT, "request_id")]
    assert all(isinstance(o, pb.RecordMemoryResponse) for o in outcomes[4:]), outcomes[4:]
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await stub.RecordMemories(pb.RecordMemoriesRequest(requests=[good[0], bad[0]]),
                                  timeout=10)
    assert from_rpc_error(batch.value).param == "requests[1].tenant_id"
    # The longest of each, in characters of 4 bytes, fits its index.
    widest = pb.RecordMemoryRequest(action="a.b", tenant_id="\U0001F600" * MAX_TENANT_ID,
                                    request_id="\U0001F601" * MAX_REQUEST_ID_CHARS)
    stored = (await stub.RecordMemory(widest, timeout=10)).record
    assert (stored.sequence, stored.request_id) == (13, widest.request_id)
    report = await MemoryStore(database.pool, Settings().memory).verify_chain()
    assert (report.intact, report.records_checked) == (True, 13), report.problem


async def test_every_caller_of_a_failed_call_gets_the_error(
        pki: TestPKI, database: Database) -> None:
    async with node(pki, "memory", Settings(), database, memory_node) as server:
        channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
    sink = GrpcAuditSink(channel, timeout_seconds=5)  # the memory node is gone
    try:
        outcomes = await asyncio.gather(*(sink.record(entry(n)) for n in range(10)),
                                        return_exceptions=True)
    finally:
        await sink.close()
        await channel.close()
    assert all(isinstance(o, FederationError) and o.code is ErrorCode.UNAVAILABLE
               for o in outcomes), outcomes  # fail closed, nobody left waiting
    assert sink.batches <= 2


async def started_memory_node(pki: TestPKI, database: Database,
                              cleanup: contextlib.AsyncExitStack, *, grace_seconds: float,
                              deny_list: DenyList | None = None) -> NodeServer:
    """A memory node with a graceful stop of ``grace_seconds`` (``node()`` stops at once),
    stopped (if the test has not) by ``cleanup``."""
    runtime = NodeRuntime(Settings(), "memory", pki.identity("memory", "server"), database,
                          CollectorRegistry(), cleanup)
    server = NodeServer(
        [await memory_node.create_service(runtime)], trust_domain=pki.ca.trust_domain,
        grpc_config=GrpcConfig(grace_seconds=grace_seconds), listen="127.0.0.1:0",
        credentials=pki.identity("memory", "server"), metrics_port=None, deny_list=deny_list)
    await server.start()
    cleanup.push_async_callback(server.stop, 0)
    return server


def handled(server: NodeServer, method: str) -> float:
    return server.registry.get_sample_value("federation_grpc_server_handled_total", {
        "grpc_service": "federation.v1.ThermalMemoryService", "grpc_method": method,
        "grpc_code": "OK"}) or 0.0


async def test_one_stream_carries_record_after_record(
        pki: TestPKI, database: Database) -> None:
    async with node(pki, "memory", Settings(), database, memory_node) as server:
        channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
        sink = GrpcAuditSink(channel, timeout_seconds=10)
        try:
            records = [await sink.record(entry(n)) for n in range(5)]
        finally:
            await sink.close()  # ends the stream: the node counts it handled
            await channel.close()
        calls = {m: handled(server, m) for m in ("StreamMemories", "RecordMemory",
                                                  "RecordMemories")}
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
    assert calls == {"StreamMemories": 1, "RecordMemory": 0, "RecordMemories": 0}


async def test_each_batch_of_a_stream_gets_its_own_answer(
        memory_channel: grpc.aio.Channel, database: Database) -> None:
    """Bad batches are answered with the error a call would have ended with; the stream
    goes on serving the next ones."""
    stub = pb_grpc.ThermalMemoryServiceStub(memory_channel)
    good = pb.RecordMemoryRequest(action="gateway.request", request_id="req_s")
    batches = {1: [good], 2: [], 3: [pb.RecordMemoryRequest(action="")], 4: [good, good],
               5: [good] * (Settings().memory.max_batch + 1)}
    call = stub.StreamMemories()
    for batch_id, requests in batches.items():
        await call.write(pb.StreamMemoriesRequest(batch_id=batch_id, requests=requests))
    await call.done_writing()
    answers: dict[int, pb.StreamMemoriesResponse] = {}
    while (answer := await call.read()) is not grpc.aio.EOF:
        assert isinstance(answer, pb.StreamMemoriesResponse)
        answers[answer.batch_id] = answer
    assert await call.code() is grpc.StatusCode.OK
    assert sorted(answers) == [1, 2, 3, 4, 5]
    assert [r.sequence for r in answers[1].records] + [
        r.sequence for r in answers[4].records] == [1, 2, 3]
    errors = {n: (a.error.code, a.error.param) for n, a in answers.items() if a.HasField("error")}
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors == {2: (invalid, "requests"), 3: (invalid, "requests[0].action"),
                      5: (invalid, "requests")}
    assert await MemoryStore(database.pool, Settings().memory).head() == 3


async def test_an_unanswered_batch_fails_its_callers_and_resets_the_stream(
        memory_channel: grpc.aio.Channel, database: Database) -> None:
    sink = GrpcAuditSink(memory_channel, timeout_seconds=1)
    try:
        async with database.pool.acquire() as conn, conn.transaction():
            # The memory node's INSERT waits for this lock: the batch goes unanswered.
            await conn.execute("LOCK TABLE memory_records IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(FederationError) as late:
                await sink.record(entry(1))
        assert late.value.code is ErrorCode.DEADLINE_EXCEEDED
        after = await sink.record(entry(2))  # on a new stream
    finally:
        await sink.close()
    # The late record was committed once the lock went: written, though its caller
    # failed (a request answered 503 is recorded, never one answered unrecorded).
    assert after.sequence == 2
    report = await MemoryStore(database.pool, Settings().memory).verify_chain()
    assert report.intact and report.records_checked == 2


async def test_a_stopping_node_ends_an_idle_stream_at_once(
        pki: TestPKI, database: Database) -> None:
    """The node's graceful stop does not wait out its grace for a writer's idle stream;
    the writer's next record fails (UNAVAILABLE, nobody left waiting)."""
    async with contextlib.AsyncExitStack() as cleanup:
        server = await started_memory_node(pki, database, cleanup, grace_seconds=30)
        channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
        sink = GrpcAuditSink(channel, timeout_seconds=10)
        try:
            await sink.record(entry(1))  # the stream is open, and idle from now on
            started = time.monotonic()
            await server.stop(30)
            stopped_in = time.monotonic() - started
            with pytest.raises(FederationError) as refused:
                await sink.record(entry(2))
        finally:
            await sink.close()
            await channel.close()
    assert stopped_in < 5, stopped_in
    assert refused.value.code is ErrorCode.UNAVAILABLE


async def test_a_stream_refuses_batches_once_its_writers_certificate_is_denied(
        pki: TestPKI, database: Database) -> None:
    """Checked at every batch, not only when the stream opened: a stream may outlive the
    moment its writer's certificate was denied (or expired)."""
    denials = pki.home / "deny.json"
    async with contextlib.AsyncExitStack() as cleanup:
        server = await started_memory_node(pki, database, cleanup, grace_seconds=1,
                                           deny_list=DenyList(denials, reload_seconds=0.0))
        channel = pki.channel(f"127.0.0.1:{server.port}", "gateway")
        sink = GrpcAuditSink(channel, timeout_seconds=10)
        try:
            before = await sink.record(entry(1))  # the stream is open
            add_denial(denials, identity=f"spiffe://{pki.ca.trust_domain}/node/test/gateway",
                       reason="stolen laptop")
            with pytest.raises(FederationError) as refused:
                await sink.record(entry(2))
        finally:
            await sink.close()
            await channel.close()
    assert before.sequence == 1
    assert refused.value.code is ErrorCode.UNAUTHENTICATED
    assert "denied (stolen laptop)" in refused.value.message
    assert await MemoryStore(database.pool, Settings().memory).head() == 1


async def test_a_record_names_the_node_that_wrote_it_whatever_the_writer_claims(
        memory_channel: grpc.aio.Channel, pki: TestPKI) -> None:
    sink = GrpcAuditSink(memory_channel, timeout_seconds=10)
    forged = AuditEntry(actor="spiffe://federation/admin", action="keys.revoke",
                        tenant_id="t1", attributes={memory_node.RECORDED_BY: "admin"})
    try:
        records = [await sink.record(entry(1)), await sink.record(forged)]
    finally:
        await sink.close()
    writer = pki.identity("gateway").identity.spiffe_id
    assert [r.attributes[memory_node.RECORDED_BY] for r in records] == [writer, writer]
    assert records[0].attributes["n"] == "1"  # the writer's own attributes are kept
    assert records[1].actor == "spiffe://federation/admin"  # what the writer says acted
