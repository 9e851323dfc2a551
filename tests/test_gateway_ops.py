"""Operational endpoints of the gateway: /health, /metrics, /openapi.json, with the real
key authority and thermal memory nodes (real PostgreSQL) configured as its peers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from federation.db import Database
from federation.inference.test_backend import TestBackend
from gateway_http.app import GatewayServer
from gateway_http.state import DATABASE_WATCH
from tests.db_support import OwnCluster, own_cluster
from tests.gateway_support import InferenceNode, gateway_settings, inference_nodes
from tests.keys_support import KeyNodes, key_nodes
from tests.stack_support import Stack, federation_stack
from tests.support import TestPKI


@dataclass
class Gateway:
    base: str
    nodes: list[InferenceNode]
    key: str
    """A chat key minted by the key authority."""


@pytest.fixture
async def federation(pki: TestPKI, database: Database) -> AsyncIterator[KeyNodes]:
    async with key_nodes(pki, database) as nodes:
        yield nodes


@pytest.fixture
async def gateway(pki: TestPKI, federation: KeyNodes) -> AsyncIterator[Gateway]:
    key = (await federation.issue("t", ["chat"])).secret
    async with inference_nodes(pki, [TestBackend(), TestBackend()]) as nodes:
        settings = federation.wire(gateway_settings(pki.home, [n.address for n in nodes]))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        yield Gateway(f"http://127.0.0.1:{server.port}", nodes, key)
        await server.stop()


async def get(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.text()


async def test_health_lists_components(gateway: Gateway) -> None:
    status, headers, body = await get(gateway.base + "/health")
    assert status == 200
    assert "x-request-id" in headers
    assert headers["server"] == "federation"  # not aiohttp's, which names its versions
    report = json.loads(body)
    assert report["status"] == "ok"
    inference = report["components"]["inference"]
    assert inference["status"] == "serving"
    assert [n["status"] for n in inference["nodes"]] == ["serving", "serving"]
    components = report["components"]
    assert (components["keys"]["status"], components["memory"]["status"]) == (
        "serving", "serving")
    assert components["guardian"]["status"] == "not_configured"
    for node in gateway.nodes:
        await node.kill()
    status, _, body = await get(gateway.base + "/health")
    assert status == 503
    assert '"inference":{"status":"down"' in body.replace(" ", "")


async def test_health_is_503_when_a_component_is_down(
    pki: TestPKI, federation: KeyNodes
) -> None:
    assert federation.memory_node is not None
    await federation.memory_node.stop()
    async with inference_nodes(pki, [TestBackend()]) as nodes:
        settings = federation.wire(gateway_settings(pki.home, [nodes[0].address],
                                                    health_timeout_seconds=0.5))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        try:
            status, _, body = await get(f"http://127.0.0.1:{server.port}/health")
        finally:
            await server.stop()
    assert status == 503
    compact = body.replace(" ", "")
    assert '"memory":{"status":"unreachable"}' in compact
    assert '"keys":{"status":"serving"}' in compact


async def test_metrics_after_traffic(gateway: Gateway) -> None:
    base = gateway.base
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=gateway.key,
                                  max_retries=0) as client:
        await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "a b c"}])
        stream = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "a b c"}], stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=base + "/v1", api_key="bad", max_retries=0
                                     ).models.list()
    status, headers, text = await get(base + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert ('federation_gateway_requests_total{model="test-model",'
            'route="/v1/chat/completions",status="200"} 2.0') in text
    assert 'federation_gateway_requests_total{model="",route="/v1/models",status="401"} 1.0' in text
    assert 'federation_gateway_time_to_first_token_seconds_count{model="test-model"} 2.0' in text
    assert 'federation_gateway_tokens_total{kind="completion",model="test-model"} 6.0' in text
    assert 'federation_gateway_requests_in_flight{route="/v1/chat/completions"} 0.0' in text
    assert "federation_gateway_generation_tokens_per_second_bucket" in text
    assert "federation_gateway_upstream_errors_total" in text


async def test_openapi_document(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(
            gateway.base + "/openapi.json") as response:
        document = await response.json()
    assert document["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
            "/health", "/metrics"} <= set(document["paths"])
    operation = document["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "403", "404", "413", "429", "503"} <= set(operation["responses"])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[OwnCluster]:
    """A PostgreSQL of this test's own, for the gateway's database: its postmaster is frozen."""
    with own_cluster(tmp_path / "pg" / "data") as running:
        yield running


async def database_health(stack: Stack) -> tuple[int, str]:
    status, _, body = await get(stack.base + "/health")
    return status, json.loads(body)["components"]["database"]["status"]


async def until_database_health(stack: Stack, wanted: str) -> int:
    """The /health status once its database component reads ``wanted`` (polled: the
    change is in another process, which offers nothing to await)."""
    async with asyncio.timeout(30):
        while (answer := await database_health(stack))[1] != wanted:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return answer[0]


async def test_health_sees_that_no_new_database_connection_can_be_made(
        tmp_path: Path, database: Database, cluster: OwnCluster) -> None:
    """Only the postmaster frozen: sessions already open keep answering (the database
    watch's among them), but no new connection can be made, which ``federation status``
    reports as unreachable; so does ``/health`` now."""
    async with federation_stack(tmp_path, database, cluster.url,
                                gateway_config={"health_database_cache_seconds": 0.2}) as stack:
        assert await database_health(stack) == (200, "serving")
        watch = stack.gateway.app[DATABASE_WATCH]
        await watch.check()  # its session is open, as it is from its first probe on
        os.kill(cluster.postmaster_pid, signal.SIGSTOP)
        try:
            assert await until_database_health(stack, "unreachable") == 503
            assert watch.reachable  # what /health went by: the watch's old session answers
        finally:
            os.kill(cluster.postmaster_pid, signal.SIGCONT)
        assert await until_database_health(stack, "serving") == 200
