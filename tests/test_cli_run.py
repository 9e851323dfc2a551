"""``federation node`` / ``gateway``: how a process that the database stopped exits."""

from __future__ import annotations

import pytest

from federation.cli.run import _exit_on_database_outage
from federation.db import DatabaseUnreachable
from federation.db.errors import EXIT_DATABASE_UNAVAILABLE


async def test_an_outage_without_text_still_says_what_it_was(
        capsys: pytest.CaptureFixture[str]) -> None:
    # A timeout raised inside asyncpg has no text: the line ended at its colon.
    with pytest.raises(SystemExit) as exited:
        async with _exit_on_database_outage():
            raise DatabaseUnreachable()
    assert exited.value.code == EXIT_DATABASE_UNAVAILABLE
    line = capsys.readouterr().err.strip()
    assert line == "federation: error: the database is unavailable: DatabaseUnreachable"


async def test_other_failures_are_left_to_the_caller() -> None:
    with pytest.raises(ValueError, match="not an outage"):
        async with _exit_on_database_outage():
            raise ValueError("not an outage")
