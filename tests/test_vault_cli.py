"""``federation vault`` handlers over the real vault (the federation's channels replaced)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from federation.cli import vault as vault_commands
from federation.config import Settings
from federation.vault.service import VaultService
from tests.test_vault_service import (  # noqa: F401 - fixtures
    gateway_channel,
    guardian,
    vault,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vault_commands.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["vault", *argv])


async def run(settings: Settings, *argv: str) -> str:
    args = parse(*argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert await args.handler(settings, args) == 0
    return out.getvalue()


def cli_opens(service: VaultService, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands open this test's vault (on the test's database) instead of the home's."""
    @contextlib.asynccontextmanager
    async def open_test_vault(settings: Settings) -> AsyncIterator[VaultService]:
        yield service

    monkeypatch.setattr(vault_commands, "open_vault", open_test_vault)


async def test_put_get_recover_list_destroy(
    vault: VaultService, home: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    cli_opens(vault, monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"p@ss\n")))
    settings = Settings(home=home)
    put = json.loads(await run(settings, "put", "--tenant", "t1", "db", "--json"))
    assert put["name"] == "db" and put["client_share"].startswith("fedshare_")
    got = json.loads(await run(settings, "get", put["id"], "--share", put["client_share"],
                               "--json"))
    assert got["value"] == "p@ss\n"
    recovered = json.loads(await run(settings, "recover", put["id"], "--reason", "lost",
                                     "--json"))
    assert recovered["version"] == 2
    listed = await run(settings, "list", "--tenant", "t1")
    assert put["id"] in listed and "fedshare_" not in listed
    assert "destroyed" in await run(settings, "destroy", put["id"])


async def test_the_client_share_can_come_from_stdin_not_the_command_line(
    vault: VaultService, home: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    # A share given as --share S is readable by every local user (/proc/PID/cmdline)
    # while the command runs, and is kept in the shell's history: get and rotate
    # required it there.
    cli_opens(vault, monkeypatch)
    settings = Settings(home=home)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"s3cret")))
    put = json.loads(await run(settings, "put", "--tenant", "t1", "db", "--json"))
    share = put["client_share"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{share}\n".encode())))
    got = json.loads(await run(settings, "get", put["id"], "--json"))
    assert got["value"] == "s3cret"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{share}\n".encode())))
    rotated = json.loads(await run(settings, "rotate", put["id"], "--share", "-", "--json"))
    assert rotated["version"] == 2 and rotated["client_share"] != share
