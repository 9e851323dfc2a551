"""HTTPS on the gateway: TLS 1.3 minimum with Python's ssl; the official openai client
works over it (trusting the federation root), a TLS 1.2 client is refused, and a
renewed certificate is served without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from federation.db import Database
from federation.pki import leaf_certificate, renew_identities
from tests.stack_support import MODEL, Stack, federation_stack


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    config = {"tls": "federation", "tls_reload_seconds": 0.2}
    async with federation_stack(tmp_path, database, pg_url, gateway_config=config) as stack:
        yield stack


def _handshake(port: int, ca: Path, version: ssl.TLSVersion) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return str(tls.version())


def _served_serial(port: int, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_openai_client_chats_over_https(stack: Stack) -> None:
    issued = await stack.issue("acme", ["chat"])
    ca = stack.pki.ca.paths.ca_cert
    verify = ssl.create_default_context(cafile=str(ca))
    async with openai.DefaultAsyncHttpxClient(verify=verify) as http:
        client = openai.AsyncOpenAI(base_url=f"https://localhost:{stack.gateway.port}/v1",
                                    api_key=issued.secret, http_client=http)
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "over tls"}], max_tokens=8)
        assert reply.choices[0].message.content == "over tls"
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "streamed too"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "streamed too"


async def test_tls_1_2_is_refused_and_1_3_negotiated(stack: Stack) -> None:
    ca, port = stack.pki.ca.paths.ca_cert, stack.gateway.port
    assert await asyncio.to_thread(_handshake, port, ca, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(_handshake, port, ca, ssl.TLSVersion.TLSv1_2)


async def test_plain_http_is_not_served_on_the_https_port(stack: Stack) -> None:
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{stack.gateway.port}/health",
                timeout=aiohttp.ClientTimeout(total=5)):
            pass


async def test_a_renewed_certificate_is_served_without_a_restart(stack: Stack) -> None:
    ca, port = stack.pki.ca.paths.ca_cert, stack.gateway.port
    before = await asyncio.to_thread(_served_serial, port, ca)
    renew_identities(stack.pki.ca, dt.timedelta(days=10_000))
    renewed = leaf_certificate(stack.pki.identity("gateway").cert).serial_number
    assert renewed != before
    served = before
    for _ in range(100):  # the reload runs every 0.2 s
        served = await asyncio.to_thread(_served_serial, port, ca)
        if served == renewed:
            break
        await asyncio.sleep(0.1)
    assert served == renewed
    assert stack.gateway.https is not None and stack.gateway.https.reloads == 1


async def test_the_gateway_exports_its_certificates_expiry(stack: Stack) -> None:
    context = ssl.create_default_context(cafile=str(stack.pki.ca.paths.ca_cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http, \
            http.get(f"https://localhost:{stack.gateway.port}/metrics") as response:
        body = await response.text()
    expiry = leaf_certificate(stack.pki.identity("gateway").cert).not_valid_after_utc
    values = {(sample.labels["kind"], sample.labels["identity"]): sample.value
              for family in text_string_to_metric_families(body)
              for sample in family.samples
              if sample.name == "federation_certificate_expiry_timestamp_seconds"}
    gateway = "spiffe://federation.local/node/test/gateway"
    assert set(values) == {("leaf", gateway), ("https", gateway), ("intermediate", "nodes-ca"),
                           ("ca", "federation.local")}
    assert values["https", gateway] == values["leaf", gateway] == expiry.timestamp()
