"""The interceptor on request streams, through real mTLS servers: a message that does
not parse ends the call INVALID_ARGUMENT (after authorization), as a unary request does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from federation.config import Settings
from federation.db import Database
from federation.v1 import edge_broker_pb2 as epb
from federation.v1 import thermal_memory_pb2 as mpb
from nodes import memory as memory_node
from tests.edge_support import BrokerNode, device_stub, register
from tests.nodes_support import node
from tests.support import TestPKI

STREAM_MEMORIES = "/federation.v1.ThermalMemoryService/StreamMemories"
UPLOAD = "/federation.v1.EdgeBrokerService/Upload"
NOT_UTF8_ACTION = b"\x12\x04\x1a\x02\xff\xfe"
"""A StreamMemoriesRequest whose first record's ``action`` is not UTF-8."""
NOT_UTF8_UPLOAD_ID = b"\x0a\x04\x0a\x02\xff\xfe"
"""An UploadRequest whose ``start.upload_id`` is not UTF-8."""
CORRUPT = b"\xff\xff\xff"
"""No message at all: a corrupt wire format."""


@pytest.fixture
async def memory(pki: TestPKI, database: Database) -> AsyncIterator[int]:
    async with node(pki, "memory", Settings(), database, memory_node) as server:
        yield server.port


async def _messages(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def _raw_bidi(channel: grpc.aio.Channel, method: str) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(method, request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)


async def _bidi_error(channel: grpc.aio.Channel, *messages: bytes) -> grpc.aio.AioRpcError:
    call = _raw_bidi(channel, STREAM_MEMORIES)(_messages(*messages))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in call:
            pass
    return failed.value


@pytest.mark.parametrize("garbage", [CORRUPT, NOT_UTF8_ACTION])
async def test_an_undecodable_message_on_a_bidi_stream_is_invalid_argument(
        pki: TestPKI, memory: int, garbage: bytes) -> None:
    good = mpb.StreamMemoriesRequest(batch_id=1, requests=[
        mpb.RecordMemoryRequest(action="test.ok")]).SerializeToString()
    async with pki.channel(f"127.0.0.1:{memory}", "gateway") as channel:
        for messages in ((garbage,), (good, garbage)):
            refused = await _bidi_error(channel, *messages)
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
            assert "does not parse" in (refused.details() or "")
            assert "DecodeError" not in (refused.details() or "")


async def test_authorization_comes_before_the_parse_on_a_bidi_stream(
        pki: TestPKI, memory: int) -> None:
    async with pki.channel(f"127.0.0.1:{memory}", "edge") as channel:
        denied = await _bidi_error(channel, CORRUPT)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED, denied.details()


async def test_an_undecodable_message_on_a_client_stream_is_invalid_argument(
        pki: TestPKI, broker_node: BrokerNode) -> None:
    server, _ = broker_node
    stub = device_stub(pki, server.port, "phone-1")
    await register(stub)
    upload = stub.channel.stream_unary(UPLOAD, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)

    def start(upload_id: str) -> bytes:
        # An upload of its own for each call: an ended stream's writer lease is released
        # after the caller has the status, and the next call could find it still held.
        return epb.UploadRequest(start=epb.UploadStart(
            upload_id=upload_id, total_size=4, sha256=b"\x00" * 32)).SerializeToString()

    for messages in ((CORRUPT,), (start("u1"), NOT_UTF8_UPLOAD_ID), (start("u2"), CORRUPT)):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await upload(_messages(*messages))
        refused = failed.value
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
        assert "does not parse" in (refused.details() or "")
    other = device_stub(pki, server.port, "ops", role="inference")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await other.channel.stream_unary(UPLOAD, request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)(_messages(CORRUPT))
    assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
