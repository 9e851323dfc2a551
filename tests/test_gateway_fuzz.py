"""A property-based API fuzzer over the gateway's own ``/openapi.json`` (schemathesis).

For every operation the gateway documents, schemathesis generates requests from the
schema, valid ones and invalid ones (positive and negative modes), and each answer
must be neither a server error (5xx) nor a status the document does not list for
that operation. The examples are bounded and the seed fixed, so a run is repeatable
and fits in ``make test``; a failure lists every offending case with a curl command
that reproduces it.

Against the gateway as deployed (``tests/stack_support.py``: the real key authority,
memory, guardian and inference nodes over mTLS, real PostgreSQL), with a key that has
every scope the routes ask for. The gateway serves on this test's event loop, so the
fuzzer (synchronous: ``requests`` under schemathesis) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from federation.db import Database
from federation.v1 import key_authority_pb2 as kpb
from tests.council_gateway_support import council_gateway
from tests.stack_support import MODEL, Stack, federation_stack

pytestmark = pytest.mark.timeout(300)

SEED = 20261207
EXAMPLES = 60
"""Generated cases per operation and mode: about 600 requests in all."""
COUNCIL_EXAMPLES = 30
"""Each council vote asks seven members and a synthesis: fewer cases."""
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
CHECKS = [not_a_server_error, status_code_conformance]
CHAT = "POST /v1/chat/completions"
GENERATING = {CHAT, "POST /v1/completions", "POST /v1/embeddings"}


@pytest.fixture
async def stack(tmp_path: Path, database: Database, pg_url: str) -> AsyncIterator[Stack]:
    async with federation_stack(tmp_path, database, pg_url) as running:
        yield running


@dataclass
class Findings:
    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def fuzz(document: dict[str, Any], base: str, key: str, *, examples: int = EXAMPLES,
         paths: str = "/") -> Findings:
    """Every operation of ``document`` under ``paths``, in both modes; collects
    failures, never stops early."""
    schema = schemathesis.openapi.from_dict(document)
    auth = {"Authorization": f"Bearer {key}"}
    findings = Findings()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path.startswith(paths):
                for mode in MODES:
                    _fuzz_operation(operation, mode, examples, base, auth, session, findings)
    return findings


def _fuzz_operation(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode,
                    examples: int, base: str, auth: dict[str, str], session: requests.Session,
                    findings: Findings) -> None:
    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=examples, database=None, deadline=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        findings.cases += 1
        if operation.label in GENERATING and isinstance(case.body, dict) and findings.cases % 2:
            case.body["model"] = MODEL  # half the generations reach the inference node
        response = case.call(base_url=base, session=session, headers=auth, timeout=30)
        findings.statuses[response.status_code] = (
            findings.statuses.get(response.status_code, 0) + 1)
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except (AssertionError, BaseExceptionGroup) as failure:  # record; keep generating
            findings.failures.append(
                f"{operation.label} ({mode.value}) -> {response.status_code} "
                f"{response.text[:300]!r}\n  {failure}\n  "
                f"{case.as_curl_command(headers=auth, base_url=base)}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing there to make invalid


async def test_fuzzing_the_openapi_document_finds_no_server_error_and_no_undocumented_status(
        stack: Stack) -> None:
    issued = await stack.keys.IssueKey(kpb.IssueKeyRequest(
        tenant_id="fuzz", scopes=["chat", "embeddings", "vault:read", "vault:write", "admin"],
        requests_per_minute=100_000))
    async with stack.http.get(stack.base + "/openapi.json") as response:
        document = await response.json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
            "/v1/vault/secrets"} <= set(document["paths"])
    started = time.monotonic()
    findings = await asyncio.to_thread(fuzz, document, stack.base, issued.secret)
    elapsed = time.monotonic() - started
    summary = (f"{findings.cases} cases in {elapsed:.1f} s, statuses "
               f"{dict(sorted(findings.statuses.items()))}")
    assert not findings.failures, summary + "\n\n" + "\n\n".join(findings.failures)
    operations = sum(len(methods) for methods in document["paths"].values())
    assert findings.cases >= operations * EXAMPLES, summary  # every operation was fuzzed
    print(summary)


async def test_fuzzing_the_council_route_finds_no_server_error_and_no_undocumented_status(
        home: Path, database: Database) -> None:
    """``/v1/council/vote`` on a gateway with a council node (the stack above has none,
    and so does not document the route)."""
    async with council_gateway(home, database) as council, aiohttp.ClientSession() as http:
        async with http.get(council.base + "/openapi.json") as response:
            document = await response.json()
        assert "/v1/council/vote" in document["paths"]
        findings = await asyncio.to_thread(fuzz, document, council.base, council.key,
                                           examples=COUNCIL_EXAMPLES, paths="/v1/council/")
    summary = f"{findings.cases} cases, statuses {dict(sorted(findings.statuses.items()))}"
    assert not findings.failures, summary + "\n\n" + "\n\n".join(findings.failures)
    assert findings.cases >= COUNCIL_EXAMPLES, summary
    print(summary)
