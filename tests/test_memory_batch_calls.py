"""The audit client's side of the group commit, through a real memory node over mTLS:
concurrent records of one client share RecordMemories calls, each caller still gets its
own committed record, and a bad record fails only its own caller."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

import grpc
import pytest

from federation.config import Settings
from federation.db import Database
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.logs import request_id_var
from federation.memory import AuditEntry, MemoryRecord
from federation.memory.client import GrpcAuditSink
from federation.memory.restore_event import RESTORE_ACTION
from federation.memory.store import MemoryStore
from federation.v1 import thermal_memory_pb2 as pb
from federation.v1 import thermal_memory_pb2_grpc as pb_grpc
from nodes import memory as memory_node
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
        assert sink.calls == 1 and alone.request_id == "req_alone"
        records = await asyncio.gather(
            *(as_request(f"req_{n}", sink, entry(n)) for n in range(1, 41)))
    finally:
        await sink.close()
    assert sink.calls <= 3, sink.calls  # forty records, not forty calls
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
    }
    params = {}
    for what, requests in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordMemories(pb.RecordMemoriesRequest(requests=requests), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, what
        params[what] = from_rpc_error(refused.value).param
    assert params == {"no records": "requests", "over the batch limit": "requests",
                      "a reserved action": "requests[1].action",
                      "a temperature over 100": "requests[1].temperature"}
    assert await MemoryStore(database.pool, Settings().memory).head() == 0
    written = await stub.RecordMemories(pb.RecordMemoriesRequest(requests=[good, good]),
                                        timeout=10)
    assert [r.sequence for r in written.records] == [1, 2]
    assert {r.request_id for r in written.records} == {"req_good"}


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
    assert sink.calls <= 2
