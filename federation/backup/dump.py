"""``federation backup``: one consistent snapshot of the database, and its manifest.

Consistency: a repeatable-read transaction exports its snapshot
(``pg_export_snapshot()``), the manifest's facts (the audit chain's head, the
database's identity) are read in it, and ``pg_dump --snapshot`` dumps exactly that
snapshot while the transaction stays open. The manifest's "last audit record" is
therefore the last one in the dump, whatever is written meanwhile. Requests keep
running: pg_dump takes only ACCESS SHARE locks.

The backup is written to ``<out>.partial`` and renamed to ``<out>`` once every
file is written, checksummed and fsynced: a directory named like a backup is a
complete one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

import asyncpg

from federation.backup import BackupError
from federation.backup.manifest import (
    BLOBS_DIR,
    CHECKPOINTS_NAME,
    DENY_LIST_NAME,
    DUMP_NAME,
    Manifest,
    checksum_tree,
)
from federation.backup.postgres import Connection, run_tool, tool
from federation.config import Settings
from federation.errors import CommandError, FederationError
from federation.guardian.chain_checks import GuardianCheckpoints
from federation.guardian.checkpoints import Checkpoint
from federation.launch.endpoints import admin_channel, load_endpoints

log = logging.getLogger(__name__)


class Progress:
    """One line per step on stderr, for the person watching."""

    def __init__(self, prefix: str, stream: TextIO | None = None) -> None:
        self._prefix = prefix
        self._stream = stream or sys.stderr

    def step(self, message: str) -> None:
        print(f"{self._prefix}: {message}", file=self._stream, flush=True)


def database_url(settings: Settings) -> str:
    """The database to back up: ``FEDERATION_DATABASE_URL``, else the running federation's
    (``endpoints.json``: the embedded server ``federation up`` started)."""
    if settings.database.url:
        return settings.database.url
    try:
        dsn = load_endpoints(settings)["database"]["dsn"]
    except CommandError as exc:
        raise BackupError(f"{exc}; or set FEDERATION_DATABASE_URL") from None
    except (KeyError, TypeError):
        raise BackupError(f"{settings.endpoints_file} names no database") from None
    return str(dsn)


def default_target(settings: Settings, now: dt.datetime) -> Path:
    return settings.home / settings.backup.directory / f"backup-{now:%Y%m%dT%H%M%SZ}"


def latest_backup(settings: Settings) -> Path:
    """The newest complete backup under the backup directory (``restore latest``)."""
    root = settings.home / settings.backup.directory
    found = sorted(p for p in root.glob("backup-*")
                   if p.is_dir() and not p.name.endswith(".partial"))
    if not found:
        raise BackupError(f"no backup under {root}")
    return found[-1]


async def create_backup(settings: Settings, out: Path | None, progress: Progress) -> tuple[
        Path, Manifest]:
    """Write a backup to ``out`` (default: under the home); returns it and its manifest."""
    started = time.monotonic()
    now = dt.datetime.now(dt.UTC)
    target = (out or default_target(settings, now)).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} already exists and is not empty")
    partial = _fresh_partial(target.with_name(target.name + ".partial"))
    try:
        manifest = await _write_backup(settings, partial, progress)
        (partial / IN_PROGRESS_MARK).unlink()
        manifest = _finish(manifest, partial, started)
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
        _fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    progress.step(f"done in {manifest.seconds['total']:.1f}s: {target}")
    return target, manifest


IN_PROGRESS_MARK = ".federation-backup-in-progress"
"""In ``<out>.partial`` while a backup writes it: a leftover of a backup killed mid-way
is removed by the next one, anything else at that path is refused, not deleted."""


def _fresh_partial(partial: Path) -> Path:
    if partial.exists():
        if not (partial / IN_PROGRESS_MARK).is_file():
            raise BackupError(f"{partial} exists and is not a backup in progress: move it "
                              "away or choose another --out")
        shutil.rmtree(partial)  # a backup killed before it could clean up
    partial.mkdir(parents=True, mode=0o700)
    (partial / IN_PROGRESS_MARK).touch(mode=0o600)
    return partial


async def _write_backup(settings: Settings, directory: Path, progress: Progress) -> Manifest:
    url = database_url(settings)
    connection = Connection.of(url)
    checkpoints, source = await _guardian_checkpoints(settings, progress)
    progress.step(f"guardian checkpoints: {len(checkpoints)} ({source})")
    try:
        conn = await asyncpg.connect(url, timeout=settings.database.connect_timeout_seconds)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot connect to PostgreSQL: {exc}") from None
    try:
        identity = await _identity(conn)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            head = await conn.fetchrow(
                "SELECT sequence, hash FROM memory_records ORDER BY sequence DESC LIMIT 1")
            taken_at = await conn.fetchval("SELECT now()")
            roles, owners = await _roles_and_owners(conn)
            sequence = int(head["sequence"]) if head else 0
            progress.step(f"snapshot of {identity['database']} at audit record {sequence}")
            dump_started = time.monotonic()
            await run_tool(
                [str(tool("pg_dump")), "--format=custom", f"--snapshot={snapshot}",
                 "--no-password", f"--file={directory / DUMP_NAME}",
                 f"--dbname={connection.dsn_without_password}"],
                connection, seconds=settings.backup.tool_timeout_seconds, what="pg_dump")
            dump_seconds = time.monotonic() - dump_started
    finally:
        await conn.close()
    size = (directory / DUMP_NAME).stat().st_size
    progress.step(f"pg_dump: {size / 1e6:.1f} MB in {dump_seconds:.1f}s")
    covering = [c for c in checkpoints if c.sequence <= sequence]
    newest = max(covering, key=lambda c: c.sequence, default=None)
    _write_checkpoints(directory / CHECKPOINTS_NAME, checkpoints)
    _copy_deny_list(settings.home / settings.grpc.deny_list_file, directory / DENY_LIST_NAME)
    blob_seconds = _copy_blobs(settings.home / BLOBS_DIR, directory / BLOBS_DIR, progress)
    return Manifest(
        backup_id=f"bk_{taken_at:%Y%m%dT%H%M%SZ}_{uuid.uuid4().hex[:8]}",
        created_at=taken_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
        audit_sequence=sequence, audit_hash=bytes(head["hash"]).hex() if head else "",
        guardian_checkpoint_sequence=newest.sequence if newest else 0,
        guardian_checkpoint_hash=newest.chain_head_hash.hex() if newest else "",
        database=identity, roles=roles, owners=owners, seconds={"dump": round(dump_seconds, 3),
                                    "blobs": round(blob_seconds, 3)},
    )


def _finish(manifest: Manifest, directory: Path, started: float) -> Manifest:
    files = checksum_tree(directory)
    seconds = dict(manifest.seconds, total=round(time.monotonic() - started, 3))
    done = Manifest(**{**manifest.__dict__, "files": files, "seconds": seconds})
    done.write(directory)
    _fsync_tree(directory)
    return done


async def _identity(conn: asyncpg.Connection) -> dict[str, str]:
    """What tells this database from another: the federation's id (``federation_meta``),
    the cluster's system identifier, the database's name and the server's version."""
    row = await conn.fetchrow(
        "SELECT current_database() AS database, current_setting('server_version') AS version,"
        " current_user AS user_name")
    assert row is not None  # a SELECT without FROM returns one row
    identity = {"database": str(row["database"]), "server_version": str(row["version"]),
                "user": str(row["user_name"])}
    try:
        identity["federation_id"] = str(await conn.fetchval(
            "SELECT value FROM federation_meta WHERE key = 'federation_id'"))
    except asyncpg.UndefinedTableError:
        raise BackupError("this database holds no federation (no federation_meta table)"
                          ) from None
    try:
        identity["system_identifier"] = str(await conn.fetchval(
            "SELECT system_identifier FROM pg_control_system()"))
    except asyncpg.PostgresError:
        identity["system_identifier"] = ""  # not readable by this role: optional
    return identity


_NOT_SYSTEM = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
               "AND n.nspname NOT LIKE 'pg\\_toast%'")
_FOREIGN_OWNER = ("{owner} <> (SELECT oid FROM pg_roles WHERE rolname = current_user) "
                  "AND pg_get_userbyid({owner}) NOT LIKE 'pg\\_%'")
_OWNERS_SQL = f"""
SELECT 'SCHEMA' AS kind, quote_ident(n.nspname) AS name, pg_get_userbyid(n.nspowner) AS role
  FROM pg_namespace n WHERE {_NOT_SYSTEM} AND n.nspname NOT LIKE 'pg\\_%'
   AND {_FOREIGN_OWNER.format(owner="n.nspowner")}
UNION ALL
SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                      WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
       format('%I.%I', n.nspname, c.relname), pg_get_userbyid(c.relowner)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S') AND {_NOT_SYSTEM}
   AND {_FOREIGN_OWNER.format(owner="c.relowner")}
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d
            WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
              AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT 'FUNCTION', p.oid::regprocedure::text, pg_get_userbyid(p.proowner)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE {_NOT_SYSTEM} AND {_FOREIGN_OWNER.format(owner="p.proowner")}
 ORDER BY 1, 2
"""
_GRANTEES_SQL = f"""
SELECT DISTINCT pg_get_userbyid(a.grantee) AS role
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
 WHERE {_NOT_SYSTEM} AND {_FOREIGN_OWNER.format(owner="a.grantee")} AND a.grantee <> 0
UNION
SELECT DISTINCT pg_get_userbyid(a.grantee)
  FROM pg_namespace n, aclexplode(n.nspacl) a
 WHERE {_NOT_SYSTEM} AND {_FOREIGN_OWNER.format(owner="a.grantee")} AND a.grantee <> 0
"""


async def _roles_and_owners(conn: asyncpg.Connection) -> tuple[list[str], list[list[str]]]:
    """The roles the schema depends on besides the dumping user (``federation_guardian``,
    ``federation_gateway``), and what each owns: ``pg_dump`` does not dump roles, and
    a restore into another user must re-own these objects."""
    owners = [[r["kind"], r["name"], r["role"]] for r in await conn.fetch(_OWNERS_SQL)]
    grantees = {str(r["role"]) for r in await conn.fetch(_GRANTEES_SQL)}
    return sorted(grantees | {o[2] for o in owners}), owners


async def _guardian_checkpoints(settings: Settings, progress: Progress
                                ) -> tuple[list[Checkpoint], str]:
    """Every signed checkpoint: from the running guardian (as the operator), else from the
    guardian's file in this home, else none."""
    try:
        async with admin_channel(settings, "guardian") as channel:
            found = await GuardianCheckpoints(
                channel, settings.grpc.call_timeout_seconds).list_all()
        return sorted(found, key=lambda c: c.sequence), "from the running guardian"
    except (CommandError, FederationError) as exc:
        log.info("guardian not reachable for checkpoints", extra={"error": str(exc)[:200]})
    path = settings.home / settings.guardian.checkpoint_file
    if path.exists():
        return read_checkpoint_file(path, progress), f"from {path}"
    return [], "none found"


def read_checkpoint_file(path: Path, progress: Progress | None = None) -> list[Checkpoint]:
    """A guardian's checkpoint log. A last line that does not parse is a write cut short
    by a crash (the guardian appends one fsynced line per checkpoint) and is left out, as
    the guardian itself does when it opens the log: the log of a guardian whose host went
    down is exactly the one a restore needs. Any other bad line refuses the file."""
    checkpoints = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                checkpoints.append(Checkpoint.from_json(line))
            except (ValueError, KeyError) as exc:
                if number == len(lines):
                    if progress is not None:
                        progress.step(f"{path}:{number}: left out a last line cut short "
                                      f"({exc})")
                    continue
                raise BackupError(f"{path}:{number}: not a checkpoint ({exc})") from None
    return sorted(checkpoints, key=lambda c: c.sequence)


def _write_checkpoints(path: Path, checkpoints: list[Checkpoint]) -> None:
    path.write_text("".join(c.to_json() + "\n" for c in checkpoints))


def _copy_deny_list(source: Path, target: Path) -> None:
    """The certificates every server refuses (``federation certs deny``): not in the
    database, and a home restored without them would accept a stolen certificate again."""
    if source.is_file():
        shutil.copyfile(source, target)


def _copy_blobs(source: Path, target: Path, progress: Progress) -> float:
    """Uploaded blobs (content-addressed, never changed once in place), copied after the
    snapshot: every blob a job in the dump names was in place before the snapshot."""
    started = time.monotonic()
    if not source.is_dir():
        return 0.0
    shutil.copytree(source, target, ignore=_ignore_partials)
    count = sum(1 for p in target.rglob("*") if p.is_file())
    elapsed = time.monotonic() - started
    progress.step(f"blobs: {count} files in {elapsed:.1f}s")
    return elapsed


def _ignore_partials(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith((".part", ".tmp"))]


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        _fsync_directory(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

