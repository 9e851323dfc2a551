"""What TLS every gRPC port enforces, pinned so that the README's claim stays true.

grpcio's Python server credentials cannot set a minimum TLS version (grpc/grpc#37305;
the Core setters are not exposed yet), so TLS 1.2 is still accepted. What is enforced:
a client certificate from the federation CA, TLS 1.2 or newer, and on TLS 1.2 only
ECDHE key exchange with AES-GCM (forward secrecy, authenticated encryption); a client
that offers TLS 1.3 (every federation client does) negotiates TLS 1.3.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from federation.pki import CertificateFiles
from tests.support import TestPKI, serving


@pytest.fixture
async def node_port(tmp_path: Path) -> AsyncIterator[tuple[int, CertificateFiles]]:
    pki = TestPKI(tmp_path / "home")
    async with serving(pki, [], role="keys") as server:
        yield server.port, pki.identity("admin", "tls-probe")


def handshake(port: int, identity: CertificateFiles, *, version: ssl.TLSVersion | None = None,
              ciphers: str | None = None, certificate: bool = True) -> tuple[str, str]:
    """(protocol, cipher) the node agreed to; raises ``ssl.SSLError``/``OSError`` if refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(identity.ca_cert))
    if certificate:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    context.check_hostname = False  # the node's certificate names 127.0.0.1; not tested here
    context.set_alpn_protocols(["h2"])
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        tls.do_handshake()
        # Under TLS 1.3 the server checks the client certificate after the handshake: a
        # refusal shows as the connection closing instead of the HTTP/2 SETTINGS frame.
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        if not tls.recv(1):
            raise ConnectionError("the node closed the connection")
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0]


async def test_a_default_client_negotiates_tls_1_3(node_port: tuple[int, CertificateFiles]
                                                   ) -> None:
    port, identity = node_port
    assert (await asyncio.to_thread(handshake, port, identity))[0] == "TLSv1.3"


async def test_tls_1_2_only_with_forward_secret_aead_suites(
        node_port: tuple[int, CertificateFiles]) -> None:
    port, identity = node_port
    version, cipher = await asyncio.to_thread(handshake, port, identity,
                                              version=ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and "GCM" in cipher
    for weak in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):  # CBC suites
        with pytest.raises((ssl.SSLError, OSError)):
            await asyncio.to_thread(handshake, port, identity,
                                    version=ssl.TLSVersion.TLSv1_2, ciphers=weak)


async def test_no_client_certificate_no_connection(node_port: tuple[int, CertificateFiles]
                                                   ) -> None:
    port, identity = node_port
    with pytest.raises((ssl.SSLError, OSError)):
        await asyncio.to_thread(handshake, port, identity, certificate=False)
