"""The backup manifest: what was backed up, from which database, up to which audit record,
and the SHA-256 of every file, so that a damaged backup is refused before a restore
writes anything."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from federation.backup import BackupError

MANIFEST_NAME: Final = "manifest.json"
FORMAT: Final = "federation-backup/1"
DUMP_NAME: Final = "database.dump"
CHECKPOINTS_NAME: Final = "checkpoints.jsonl"
BLOBS_DIR: Final = "blobs"
DENY_LIST_NAME: Final = "denied.json"
_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    created_at: str
    """RFC 3339, UTC: when the snapshot was taken."""
    audit_sequence: int
    """The last audit record in the snapshot (0: an empty chain)."""
    audit_hash: str
    """Its hash (hex; empty for an empty chain)."""
    guardian_checkpoint_sequence: int
    """The newest guardian checkpoint at or below ``audit_sequence`` (0: none)."""
    guardian_checkpoint_hash: str
    database: dict[str, str]
    """The database's identity: federation id, cluster system identifier, name, version."""
    roles: list[str] = field(default_factory=list)
    """Roles other than the dumping user that own or are granted something (created
    NOLOGIN before the restore when the target cluster lacks them)."""
    owners: list[list[str]] = field(default_factory=list)
    """``[kind, name, role]`` of every object owned by one of ``roles``: the dump is
    restored ``--no-owner`` (into whichever user restores) and these are re-owned."""
    files: dict[str, FileEntry] = field(default_factory=dict)
    """Relative path -> checksum and size, for every file of the backup but this one."""
    format: str = FORMAT
    seconds: dict[str, float] = field(default_factory=dict)
    """How long each step took (dump, blobs, total)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> None:
        path = directory / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise BackupError(f"{directory} is not a backup: {MANIFEST_NAME} is missing"
                              ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackupError(f"{path} is damaged: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BackupError(f"{path} is not a {FORMAT} manifest")
        try:
            files = {name: FileEntry(**entry) for name, entry in data.pop("files").items()}
            return cls(files=files, **data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise BackupError(f"{path} is damaged: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_tree(directory: Path) -> dict[str, FileEntry]:
    """Every regular file under ``directory`` but the manifest, by relative path."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            name = path.relative_to(directory).as_posix()
            entries[name] = FileEntry(sha256_file(path), path.stat().st_size)
    return entries


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Refuse (one line) a backup with a missing, truncated, altered or extra file."""
    if DUMP_NAME not in manifest.files:
        raise BackupError(f"{directory / MANIFEST_NAME} lists no {DUMP_NAME}")
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise BackupError(f"backup refused: {name} is missing from {directory}")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BackupError(f"backup refused: {name} is {size} bytes, the manifest says "
                              f"{entry.bytes} (truncated or altered)")
        if sha256_file(path) != entry.sha256:
            raise BackupError(f"backup refused: {name} does not match its SHA-256 in the "
                              "manifest (corrupted)")
    extra = sorted(set(checksum_names(directory)) - set(manifest.files))
    if extra:
        raise BackupError(f"backup refused: {extra[0]} is not in the manifest")


def checksum_names(directory: Path) -> list[str]:
    return [p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME]
