"""A gateway serving the council routes, on a real council node (``council_support``)
and a real key authority, for the edge and fuzz tests."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from federation.council.scripted_backend import Script, ScriptedCouncilBackend, vote_json
from federation.db import Database
from gateway_http.app import GatewayServer
from tests.council_support import council_stack
from tests.gateway_support import gateway_settings
from tests.keys_support import key_nodes
from tests.support import TestPKI


@dataclass
class CouncilGateway:
    server: GatewayServer
    key: str
    """An API key of tenant ``t1`` with the ``council`` scope."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def council_gateway(home: Path, database: Database) -> AsyncIterator[CouncilGateway]:
    pki = TestPKI(home)
    backend = ScriptedCouncilBackend(
        scripts={"crawdad": Script([vote_json("approve", 0.8, "ok", [])])})
    async with (
        council_stack(pki, database, backend) as stack,
        key_nodes(pki, database,
                  memory_address=f"127.0.0.1:{stack.memory_server.port}") as federation,
    ):
        issued = await federation.issue("t1", ("council",), requests_per_minute=100_000)
        base = federation.wire(gateway_settings(home, [stack.router.nodes[0].address]))
        settings = dataclasses.replace(
            base, peers=dataclasses.replace(base.peers, council=stack.council_address))
        server = GatewayServer(settings, pki.identity("gateway"))
        await server.start()
        try:
            yield CouncilGateway(server, issued.secret)
        finally:
            await server.stop()
