"""The council's members and sub-councils, loaded from data (``members.toml``).

The file shipped next to this module holds the roadmap's seven specialists. An
operator replaces it with ``$FEDERATION_HOME/council/members.toml`` or
``council.members_file``; the replacement is validated the same way, and a bad
file stops the council node at start rather than failing votes later.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from federation.errors import ErrorCode, FederationError

SHIPPED_MEMBERS_FILE: Final = Path(__file__).with_name("members.toml")
HOME_MEMBERS_FILE: Final = Path("council") / "members.toml"
"""Relative to the federation home."""

FULL_COUNCIL: Final = ""
"""The sub-council name that means "every member"."""


class MembersFileError(ValueError):
    """The members file is missing fields or inconsistent."""


@dataclass(frozen=True)
class Member:
    key: str
    """Stable identifier: audit records, sub-councils and the API use it."""
    name: str
    specialty: str
    """Short specialty key, e.g. ``security``."""
    description: str
    model: str
    weight: float
    system: str

    @property
    def system_sha256(self) -> str:
        return hashlib.sha256(self.system.encode()).hexdigest()


@dataclass(frozen=True)
class Roster:
    """Every member, the chair, and the named sub-councils."""

    members: tuple[Member, ...]
    chair: Member
    chair_system: str
    councils: Mapping[str, tuple[str, ...]]
    """Sub-council name → member keys (only keys of defined members)."""
    source: str = ""
    """The file it was loaded from, for logs."""

    def member(self, key: str) -> Member:
        for member in self.members:
            if member.key == key:
                return member
        raise KeyError(key)

    def select(self, council: str) -> tuple[Member, ...]:
        """The members a (sub-)council asks, in roster order. Empty name: everyone."""
        if council in (FULL_COUNCIL, "full", "all"):
            return self.members
        keys = self.councils.get(council)
        if keys is None:
            known = ", ".join(sorted(self.councils)) or "none"
            raise FederationError(
                ErrorCode.INVALID_ARGUMENT,
                f"unknown council {council!r}; known sub-councils: {known}",
                param="council",
            )
        return tuple(m for m in self.members if m.key in keys)

    def find_specialty(self, specialty: str) -> tuple[Member, ...]:
        """Members matching a specialty key or a member key/name (case-insensitive)."""
        wanted = specialty.strip().lower()
        return tuple(
            m for m in self.members
            if wanted in (m.specialty.lower(), m.key.lower(), m.name.lower())
        )

    def required_votes(self, asked: int, configured_quorum: int) -> int:
        """Quorum for ``asked`` members: the configured quorum of the full council, scaled.

        ``ceil(asked * quorum / full_size)``, at least 1 and at most ``asked``: 5 of 7
        becomes 2 of 2, 1 of 1, 3 of 3, 4 of 5.
        """
        full = len(self.members)
        if asked <= 0 or full == 0:
            return 0
        scaled = math.ceil(asked * min(configured_quorum, full) / full - 1e-9)
        return max(1, min(asked, scaled))


def members_file_for(home: Path, override: str = "") -> Path:
    """Which members file applies: explicit override, then the home's, then the shipped one.

    A relative override is in the home, like every other file a setting names: the
    processes of ``federation up`` and of systemd run in no particular directory."""
    if override:
        return home / override
    candidate = home / HOME_MEMBERS_FILE
    return candidate if candidate.is_file() else SHIPPED_MEMBERS_FILE


def load_roster(path: Path | None = None) -> Roster:
    path = path or SHIPPED_MEMBERS_FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MembersFileError(f"{path}: no such members file") from None
    except tomllib.TOMLDecodeError as exc:
        raise MembersFileError(f"{path}: not valid TOML: {exc}") from exc
    return parse_roster(data, source=str(path))


def parse_roster(data: Mapping[str, Any], source: str = "") -> Roster:
    where = source or "members file"
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise MembersFileError(f"{where}: needs at least one [[members]] table")
    members = tuple(_member(where, i, raw) for i, raw in enumerate(raw_members))
    keys = [m.key for m in members]
    if len(set(keys)) != len(keys):
        raise MembersFileError(f"{where}: member keys must be unique")
    chair_table = data.get("chair")
    if not isinstance(chair_table, Mapping):
        raise MembersFileError(f"{where}: needs a [chair] table")
    chair_key = _text(where, "chair", chair_table, "member")
    if chair_key not in keys:
        raise MembersFileError(f"{where}: chair {chair_key!r} is not a member")
    chair_system = _text(where, "chair", chair_table, "system")
    councils_table = data.get("councils", {})
    if not isinstance(councils_table, Mapping):
        raise MembersFileError(f"{where}: [councils] must be a table")
    councils: dict[str, tuple[str, ...]] = {}
    for name, value in councils_table.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MembersFileError(f"{where}: councils.{name} must be a list of member keys")
        # Roadmap members that are not among the council's own are left out.
        councils[str(name)] = tuple(k for k in value if k in keys)
    chair = next(m for m in members if m.key == chair_key)
    return Roster(members, chair, chair_system, councils, source)


def _member(where: str, index: int, raw: Any) -> Member:
    label = f"members[{index}]"
    if not isinstance(raw, Mapping):
        raise MembersFileError(f"{where}: {label} must be a table")
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not (
        0 < weight <= 100 and math.isfinite(weight)
    ):
        raise MembersFileError(f"{where}: {label}.weight must be a number in (0, 100]")
    return Member(
        key=_text(where, label, raw, "key"),
        name=_text(where, label, raw, "name"),
        specialty=_text(where, label, raw, "specialty"),
        description=str(raw.get("description", "")),
        model=_text(where, label, raw, "model"),
        weight=float(weight),
        system=_text(where, label, raw, "system"),
    )


def _text(where: str, label: str, table: Mapping[str, Any], name: str) -> str:
    value = table.get(name)
    if not isinstance(value, str) or not value.strip():
        raise MembersFileError(f"{where}: {label}.{name} must be a non-empty string")
    return value.strip()


def with_model(roster: Roster, model: str, members: Sequence[str] = ()) -> Roster:
    """A copy where ``members`` (default all) run on ``model``: for tests and benchmarks."""
    from dataclasses import replace

    chosen = set(members) or {m.key for m in roster.members}
    new = tuple(replace(m, model=model) if m.key in chosen else m for m in roster.members)
    chair = next(m for m in new if m.key == roster.chair.key)
    return replace(roster, members=new, chair=chair)
