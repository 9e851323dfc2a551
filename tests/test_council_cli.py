"""``federation council ask`` against a running council node, as the local operator."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from federation.cli.council import ask_council, register
from federation.config import PeersConfig, Settings
from federation.council.scripted_backend import Script, ScriptedCouncilBackend, busy, vote_json
from federation.db import Database
from federation.pki import ADMIN_NAME
from tests.council_support import council_stack
from tests.support import TestPKI

pytestmark = pytest.mark.timeout(60)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["council", "ask", *argv])


async def test_ask_prints_a_live_line_per_member_then_the_answer(
    home: Path, database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = TestPKI(home)
    pki.identity("admin", ADMIN_NAME)
    backend = ScriptedCouncilBackend(scripts={
        "crawdad": Script([vote_json("reject", 0.75, concerns=["keys in logs"])]),
        "raven": Script([busy()]),
    })
    async with council_stack(pki, database, backend) as stack:
        settings = Settings(home=home, peers=PeersConfig(council=stack.council_address))
        assert await ask_council(settings, parse("Deploy?")) == 0
        text = capsys.readouterr().out
        assert await ask_council(settings, parse("Deploy?", "--json", "--level", "1")) == 0
        as_json = json.loads(capsys.readouterr().out)
    lines = text.splitlines()
    assert lines[0] == "round 1:"
    member_lines = [line for line in lines if line.startswith("  ")][:7]
    assert len(member_lines) == 7
    crawdad = next(line for line in member_lines if "Crawdad" in line)
    assert "reject" in crawdad and "0.75" in crawdad and " s" in crawdad
    assert "keys in logs" in crawdad
    assert any("raven" in line and "failed: resource_exhausted" in line
               for line in member_lines)
    assert "synthesising 6 votes…" in text and "Proceed." in text
    assert "decision: authorized" in text and "votes 6/7 (quorum 5)" in text
    assert "missing: raven (resource_exhausted)" in text
    assert as_json["answer"] == "Proceed." and "members" not in as_json
