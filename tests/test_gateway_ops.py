"""Operational endpoints of the gateway: /health, /metrics, /openapi.json."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from federation.inference.test_backend import TestBackend
from gateway_http.app import GatewayServer
from tests.gateway_support import FakeAudit, FakeKeys, gateway_settings, inference_nodes
from tests.support import TestPKI


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return TestPKI(tmp_path / "home")


@pytest.fixture
async def gateway(pki: TestPKI) -> AsyncIterator[tuple[str, list[TestBackend], object]]:
    backends = [TestBackend(), TestBackend()]
    async with inference_nodes(pki, backends) as nodes:
        keys = FakeKeys()
        keys.add("sk", "key_1", "t")
        server = GatewayServer(gateway_settings(pki.home, [n.address for n in nodes]),
                               pki.identity("gateway"), keys=keys, audit=FakeAudit())
        await server.start()
        yield f"http://127.0.0.1:{server.port}", backends, nodes
        await server.stop()


async def get(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, await response.text()


async def test_health_lists_components(gateway: tuple[str, list[TestBackend], object]) -> None:
    base, _, nodes = gateway
    status, headers, body = await get(base + "/health")
    assert status == 200
    assert "x-request-id" in headers
    report = json.loads(body)
    assert report["status"] == "ok"
    inference = report["components"]["inference"]
    assert inference["status"] == "serving"
    assert [n["status"] for n in inference["nodes"]] == ["serving", "serving"]
    assert report["components"]["keys"]["status"] == "not_configured"
    for node in nodes:  # type: ignore[attr-defined]
        await node.kill()
    status, _, body = await get(base + "/health")
    assert status == 503
    assert '"inference":{"status":"down"' in body.replace(" ", "")


async def test_health_is_503_when_a_component_is_down(pki: TestPKI) -> None:
    async with inference_nodes(pki, [TestBackend()]) as nodes:
        settings = gateway_settings(pki.home, [nodes[0].address], health_timeout_seconds=0.5)
        settings = dataclasses.replace(settings, peers=dataclasses.replace(
            settings.peers, memory="127.0.0.1:9"))
        server = GatewayServer(settings, pki.identity("gateway"), keys=FakeKeys(),
                               audit=FakeAudit())
        await server.start()
        try:
            status, _, body = await get(f"http://127.0.0.1:{server.port}/health")
        finally:
            await server.stop()
    assert status == 503
    assert '"memory":{"status":"unreachable"}' in body.replace(" ", "")


async def test_metrics_after_traffic(gateway: tuple[str, list[TestBackend], object]) -> None:
    base, _, _ = gateway
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk", max_retries=0) as client:
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


async def test_openapi_document(gateway: tuple[str, list[TestBackend], object]) -> None:
    base, _, _ = gateway
    async with aiohttp.ClientSession() as http, http.get(base + "/openapi.json") as response:
        document = await response.json()
    assert document["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(document["paths"])
    operation = document["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "403", "404", "413", "429", "503"} <= set(operation["responses"])
