"""The council models go through the one chat pipeline: a council answer on
``/v1/chat/completions`` is audited before it is answered (withheld when its record
cannot be written, like any model's) and lands in the tenant's transcript when the tenant
opted in. Real gateway, council, memory, key authority and guardian nodes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from federation.council.scripted_backend import Script, ScriptedCouncilBackend, vote_json
from federation.db import Database
from federation.errors import ErrorCode, FederationError
from federation.memory.client import GrpcAuditSink
from federation.memory.records import AuditEntry
from federation.memory.sink import AuditSink
from gateway_http.app import GatewayServer
from gateway_http.audit import GATEWAY_REQUEST_ACTION
from gateway_http.transcripts import TRANSCRIPTS
from tests.council_support import CouncilStack, council_stack
from tests.gateway_support import gateway_settings, quiesce
from tests.keys_support import KeyNodes, key_nodes
from tests.stack_support import federation_stack
from tests.support import TestPKI
from tests.test_tenant_transcripts import cli

pytestmark = pytest.mark.timeout(90)

QUESTION = [{"role": "user", "content": "Should we enable nightly off-site backups?"}]


class RefusingAuditSink:
    """The gateway's audit writer, which refuses gateway request records while
    ``refusing`` (the council's own audit trail goes through the council node's)."""

    def __init__(self, inner: AuditSink) -> None:
        self.inner = inner
        self.refusing = False
        self.written: list[str] = []

    async def record(self, entry: AuditEntry) -> int:
        if self.refusing and entry.action == GATEWAY_REQUEST_ACTION:
            raise FederationError(ErrorCode.UNAVAILABLE, "thermal memory is down")
        sequence = await self.inner.record(entry)
        self.written.append(entry.request_id)
        return sequence


@dataclass
class Env:
    stack: CouncilStack
    server: GatewayServer
    federation: KeyNodes
    audit: RefusingAuditSink
    key: str

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.server.port}/v1",
                                  api_key=self.key, max_retries=0)


@pytest.fixture
async def env(home: Path, database: Database) -> AsyncIterator[Env]:
    pki = TestPKI(home)
    backend = ScriptedCouncilBackend(scripts={"crawdad": Script([vote_json()])})
    async with (
        council_stack(pki, database, backend) as stack,
        key_nodes(pki, database,
                  memory_address=f"127.0.0.1:{stack.memory_server.port}") as federation,
    ):
        issued = await federation.issue("tenant_a", ("council", "chat", "embeddings"),
                                        requests_per_minute=1000)
        base = federation.wire(gateway_settings(home, [stack.router.nodes[0].address],
                                                route_refresh_seconds=60))
        settings = dataclasses.replace(
            base, peers=dataclasses.replace(base.peers, council=stack.council_address))
        channel = pki.channel(f"127.0.0.1:{stack.memory_server.port}", "gateway")
        audit = RefusingAuditSink(GrpcAuditSink(channel, timeout_seconds=5))
        server = GatewayServer(settings, pki.identity("gateway"), audit=audit)
        await server.start()
        try:
            yield Env(stack, server, federation, audit, issued.secret)
        finally:
            await server.stop()
            await channel.close()


async def test_a_council_answer_is_audited_before_it_is_answered(env: Env) -> None:
    async with env.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="council", messages=QUESTION)  # type: ignore[arg-type]
    # Written before the answer left: no waiting for the outbox.
    assert raw.headers["x-request-id"] in env.audit.written
    assert raw.parse().choices[0].message.content == "Proceed."


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": 1}, "max_tokens"), ({"max_completion_tokens": 5}, "max_tokens"),
    ({"stop": ["\n"]}, "stop"), ({"seed": 7}, "seed"), ({"n": 2}, "n"),
])
async def test_parameters_the_council_cannot_honour_are_refused(
        env: Env, extra: dict[str, object], param: str) -> None:
    async with env.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="council", messages=QUESTION,  # type: ignore[arg-type]
                                                 **extra)  # type: ignore[arg-type]
    assert caught.value.param == param  # type: ignore[attr-defined]
    # temperature is sent by many clients by default: accepted.
    async with env.client() as client:
        answer = await client.chat.completions.create(model="council", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=0.7)
    assert answer.choices[0].message.content == "Proceed."


async def test_a_council_id_on_other_endpoints_says_it_is_a_chat_model(env: Env) -> None:
    async with env.client() as client:
        with pytest.raises(openai.NotFoundError) as completion:
            await client.completions.create(model="council", prompt="Deploy?")
        with pytest.raises(openai.NotFoundError) as embedding:
            await client.embeddings.create(model="council", input="Deploy?")
    assert "answers on /v1/chat/completions only, not on /v1/completions" in \
        completion.value.message
    assert "not on /v1/embeddings" in embedding.value.message


async def test_a_council_answer_whose_record_cannot_be_written_is_withheld(env: Env) -> None:
    env.audit.refusing = True
    async with env.client() as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="council", messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.status_code == 503
        assert "audit" in caught.value.message
        stream = await client.chat.completions.create(model="council", messages=QUESTION,  # type: ignore[arg-type]
                                                      stream=True)
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
        assert "audit" in streamed.value.message
    env.audit.refusing = False
    await quiesce(env.server)  # the refusals' records, spooled, are delivered after all


@pytest.fixture
async def transcript_stack(tmp_path: Path, database: Database, pg_url: str
                           ) -> AsyncIterator[object]:
    members = ScriptedCouncilBackend(scripts={"crawdad": Script([vote_json()])})
    async with federation_stack(tmp_path, database, pg_url, council=members) as stack:
        yield stack


async def test_a_council_answer_lands_in_the_opted_in_tenants_transcript(
        transcript_stack: object) -> None:
    stack = transcript_stack
    assert hasattr(stack, "issue")
    opted = (await stack.issue("optin", ["council"])).secret
    await cli(stack.settings, "tenants", "transcripts", "optin", "on")
    async with openai.AsyncOpenAI(base_url=f"{stack.base}/v1", api_key=opted,
                                  max_retries=0) as api:
        raw = await api.chat.completions.with_raw_response.create(
            model="council", messages=QUESTION)  # type: ignore[arg-type]
        reply = raw.parse()
        assert reply.choices[0].message.content == "Proceed."
        streamed = "".join([c.choices[0].delta.content or "" async for c in
                            await api.chat.completions.create(
                                model="council/security", messages=QUESTION,  # type: ignore[arg-type]
                                stream=True) if c.choices])
        assert streamed == "Proceed."
    assert stack.gateway.app[TRANSCRIPTS].stored == 2
    (stored,) = [r for r in await stack.records("optin", "gateway.transcript.store")
                 if r.request_id == raw.headers["x-request-id"]]
    recovered = json.loads(await cli(stack.settings, "vault", "recover", stored.subject,
                                     "--reason", "council review", "--json"))
    opened = json.loads(await cli(stack.settings, "vault", "get", stored.subject, "--share",
                                  recovered["client_share"], "--json"))
    transcript = json.loads(opened["value"])
    assert (transcript["model"], transcript["completion"]) == ("council", "Proceed.")
    assert transcript["messages"] == QUESTION
