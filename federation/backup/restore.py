"""``federation restore``: a backup into a fresh home or an empty external database.

In order, and nothing is written before the first three pass:

1. the backup is checked: manifest, every file's size and SHA-256, the dump's table of
   contents (``pg_restore --list``); a damaged backup is refused with one line;
2. the guardian's checkpoints are gathered (the backup's copy, the home's log, and
   ``--guardian-checkpoints``: the surviving guardian's newer log) and each one's
   signature is checked with the home's guardian key;
3. the target must be empty: no embedded cluster in the home, or no table in the
   external database; the admin identity that will sign the restore event must exist;
4. ``pg_restore`` (one transaction) into it, the roles the schema needs created
   first and the objects they owned re-owned after (the dump is restored
   ``--no-owner``, so any user can restore it);
5. the restored chain is verified (hashes, links, the checkpoints up to the backup);
6. the signed restore event is appended (see :mod:`federation.memory.restore_event`):
   the records after the backup that the guardian's checkpoints know of are declared
   lost, and the chain goes on after the newest checkpoint, where the guardian signs
   again;
7. the merged checkpoint log is installed as the home's guardian log.

A failure after step 3 undoes what was made: the embedded cluster is deleted, and what
the restore created in an external database is dropped, so the target is empty again
and the restore can be run once more (steps 7-9 are idempotent).

``scratch=True`` (the weekly restore test) does 1, 2, 4 and 5 into a temporary
embedded cluster that is deleted afterwards; nothing in the home changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import asyncpg

from federation.backup import BackupError
from federation.backup.dump import Progress, read_checkpoint_file
from federation.backup.manifest import (
    BLOBS_DIR,
    CHECKPOINTS_NAME,
    DENY_LIST_NAME,
    DUMP_NAME,
    Manifest,
    verify_files,
)
from federation.backup.postgres import Connection, run_tool, tool
from federation.config import MemoryConfig, Settings
from federation.db import create_pool, embedded_data_dir, ensure_database
from federation.db.embedded import DATABASE, EmbeddedPostgres
from federation.durable import fsync_directory
from federation.guardian.chain_checks import VerifyReport, verify_with_checkpoints
from federation.guardian.checkpoints import (
    Checkpoint,
    GuardianKeys,
    load_public_keys,
    public_key_path,
)
from federation.memory.records import GENESIS_HASH, MemoryRecord, chain_hash
from federation.memory.restore_event import RestoreClaim, RestoreVerifier, restore_entry
from federation.memory.store import MemoryStore
from federation.memory.writer import CHAIN_LOCK_KEY, COLUMNS
from federation.pki import (
    ADMIN_NAME,
    CertificateFiles,
    PKIError,
    PKIPaths,
    certificate_files,
    ensure_identity,
    load_ca,
    write_private_file,
)


@dataclass(frozen=True)
class RestoreResult:
    manifest: Manifest
    records: int
    """Audit records restored (the backup's last sequence)."""
    claim: RestoreClaim | None
    """The restore event written (``None`` for a scratch restore)."""
    verify: VerifyReport
    target: str
    """Where it went: the home's embedded cluster, the external database, or scratch."""

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "backup_id": self.manifest.backup_id, "backup_time": self.manifest.created_at,
            "target": self.target, "records": self.records, "intact": self.verify.intact,
        }
        if self.claim is not None:
            data["restore_event"] = {
                "sequence": self.claim.event_sequence, "lost_from": self.claim.lost_from,
                "lost_to": self.claim.lost_to, "lost_count": self.claim.lost_count,
                "guardian_checkpoint_sequence": self.claim.guardian_checkpoint_sequence,
                "restored_by": self.claim.restored_by,
            }
        return data


async def check_backup(directory: Path, settings: Settings) -> Manifest:
    """Step 1: refuse a damaged backup before anything is written."""
    manifest = Manifest.read(directory)
    verify_files(directory, manifest)
    await run_tool([str(tool("pg_restore")), "--list", str(directory / DUMP_NAME)],
                   Connection("", ""), seconds=settings.backup.tool_timeout_seconds,
                   what=f"reading {DUMP_NAME}")
    return manifest


async def restore_backup(settings: Settings, directory: Path, progress: Progress, *,
                         guardian_log: Path | None = None, scratch: bool = False
                         ) -> RestoreResult:
    directory = directory.resolve()
    manifest = await check_backup(directory, settings)
    progress.step(f"backup {manifest.backup_id}: {len(manifest.files)} files match the "
                  f"manifest; audit records 1-{manifest.audit_sequence}")
    guardian_keys = _guardian_keys(settings)
    checkpoints = _gather_checkpoints(settings, directory, guardian_log, guardian_keys, scratch,
                                      progress)
    verifier = _restore_verifier(settings)
    issue_admin = None if scratch else _admin_identity(settings)
    async with _target(settings, progress, scratch) as (url, target):
        admin = issue_admin() if issue_admin is not None else None
        await _restore_dump(settings, url, directory, manifest, progress)
        async with _pool(settings, url) as pool:
            store = MemoryStore(pool, MemoryConfig(), restore_verifier=verifier)
            # The longest step of a large restore (about 55,000 records/s): said before.
            progress.step(f"verifying the restored audit chain: records 1-"
                          f"{manifest.audit_sequence}, every hash and link")
            report = await _check_restored_chain(store, manifest, checkpoints, guardian_keys)
            claim = None
            if admin is not None:
                claim = await _append_restore_event(pool, manifest, checkpoints, admin)
                progress.step(_describe(claim))
                # Records up to the backup were just verified: from there on, the event
                # and every checkpoint (the lost ones included) are checked again.
                after = await verify_with_checkpoints(
                    store, checkpoints, guardian_keys, from_sequence=max(claim.backup_sequence, 1))
                if not after.intact:
                    raise BackupError(f"the audit chain does not verify after the restore "
                                      f"event: {after.problem}")
        if not scratch:
            # Inside the target's block: should one of these fail, the database is taken
            # back to empty too, and the whole restore can simply be run again (each of
            # these is idempotent: a merged log, a list kept, content-addressed blobs).
            _install_home_files(settings, directory, checkpoints, progress)
    progress.step(f"audit chain intact: {report.records_checked} records verified "
                  f"({len(checkpoints)} guardian checkpoints)")
    return RestoreResult(manifest, manifest.audit_sequence, claim, report, target)


# -- the target database -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _target(settings: Settings, progress: Progress, scratch: bool
                  ) -> AsyncIterator[tuple[str, str]]:
    """An empty database to restore into: the external one, or an embedded cluster (the
    home's, new; or a scratch one, deleted afterwards)."""
    if settings.database.url and not scratch:
        url = settings.database.url
        await _refuse_non_empty(url)
        before = await _objects(url)
        progress.step("restoring into the external database (FEDERATION_DATABASE_URL)")
        try:
            yield url, "external database"
        except BaseException as exc:
            await _empty_again(url, before, exc, progress)
            raise
        return
    if scratch:
        place = Path(tempfile.mkdtemp(prefix="federation-restore-test-"))
        data_dir = place / "postgres" / "data"
    else:
        data_dir = embedded_data_dir(settings.home)
        if (data_dir / "PG_VERSION").exists() or data_dir.is_symlink():
            raise BackupError(f"{settings.home.resolve()} already has a database ({data_dir}); "
                              "restore into a fresh home or an empty external database")
    server = EmbeddedPostgres(data_dir, log_file=data_dir.parent.parent / "logs" /
                              "postgres.log")
    progress.step("starting " + ("a scratch PostgreSQL" if scratch else
                                 f"the home's embedded PostgreSQL ({data_dir})"))
    dsn = server.start()
    try:
        await ensure_database(dsn.url("postgres"), DATABASE)
        yield dsn.url(), "scratch database" if scratch else f"embedded database in {data_dir}"
    except BaseException:
        server.stop()
        if not scratch:
            server.delete_cluster()  # a half-restored home is not a fresh one any more
        raise
    finally:
        server.stop()
        if scratch:
            server.delete_cluster()
            shutil.rmtree(place, ignore_errors=True)


async def _refuse_non_empty(url: str) -> None:
    conn = await _connect(url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', "
            "'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'")
        name = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    if tables:
        raise BackupError(f"database {name!r} is not empty ({tables} tables); restore needs "
                          "an empty database")


_USER_SCHEMA = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg\\_%'")
_OBJECTS_SQL = f"""
SELECT 0 AS rank, 'SCHEMA' AS kind, quote_ident(n.nspname) AS name, n.oid, n.oid AS schema
  FROM pg_namespace n WHERE {_USER_SCHEMA}
UNION ALL
SELECT 1, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                         WHEN 'S' THEN 'SEQUENCE' WHEN 'f' THEN 'FOREIGN TABLE'
                         ELSE 'TABLE' END,
       format('%I.%I', n.nspname, c.relname), c.oid, n.oid
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
UNION ALL
SELECT 2, 'ROUTINE', p.oid::regprocedure::text, p.oid, n.oid
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {_USER_SCHEMA}
UNION ALL
SELECT 3, CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
       format('%I.%I', n.nspname, t.typname), t.oid, n.oid
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE {_USER_SCHEMA} AND (t.typtype IN ('e', 'd', 'r') OR (t.typtype = 'c' AND
       (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c'))
 ORDER BY 1, 3
"""
"""Every object a dump can create in a database: schemas, relations, routines, types
(rank, DROP kind, qualified name, oid, the schema's oid)."""

_DatabaseObjects = set[tuple[int, int]]


async def _objects(url: str) -> _DatabaseObjects:
    """(rank, oid) of every object in the database now: what a failed restore keeps."""
    conn = await _connect(url)
    try:
        return {(int(r["rank"]), int(r["oid"])) for r in await conn.fetch(_OBJECTS_SQL)}
    finally:
        await conn.close()


async def _empty_again(url: str, before: _DatabaseObjects, error: BaseException,
                       progress: Progress) -> None:
    """A restore into the external database failed after the data may have gone in: drop,
    in one transaction, every object that was not there before, so the database is as it
    was (empty) and the restore can be run again. When that fails too, the error says
    what is left and what to do."""
    try:
        conn = await _connect(url)
        try:
            async with conn.transaction():
                created = [r for r in await conn.fetch(_OBJECTS_SQL)
                           if (int(r["rank"]), int(r["oid"])) not in before]
                new_schemas = {int(r["oid"]) for r in created if r["rank"] == 0}
                for row in created:
                    if row["rank"] != 0 and int(row["schema"]) in new_schemas:
                        continue  # dropped with its schema
                    await conn.execute(f"DROP {row['kind']} IF EXISTS {row['name']} CASCADE")
        finally:
            await conn.close()
    except (BackupError, OSError, TimeoutError, asyncpg.PostgresError) as exc:
        name = urlsplit(url).path.lstrip("/") or "the database"
        raise BackupError(f"{_reason(error)}; and what the restore wrote into {name!r} could "
                          f"not be dropped again ({exc}): drop and re-create {name!r} before "
                          "restoring again") from None
    if created:
        progress.step(f"the external database is empty again ({len(created)} objects the "
                      "restore made were dropped)")


def _reason(error: BaseException) -> str:
    if isinstance(error, BackupError):
        return str(error)
    return "the restore was interrupted" if isinstance(
        error, (KeyboardInterrupt, asyncio.CancelledError)) else f"{type(error).__name__}: {error}"


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise BackupError(f"cannot connect to PostgreSQL: {exc}") from None


@contextlib.asynccontextmanager
async def _pool(settings: Settings, url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(url, settings.database, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def _restore_dump(settings: Settings, url: str, directory: Path, manifest: Manifest,
                        progress: Progress) -> None:
    conn = await _connect(url)
    try:
        for role in manifest.roles:
            await _ensure_role(conn, role)
    finally:
        await conn.close()
    connection = Connection.of(url)
    started = dt.datetime.now(dt.UTC)
    await run_tool(
        [str(tool("pg_restore")), "--no-owner", "--single-transaction", "--exit-on-error",
         "--no-password", f"--dbname={connection.dsn_without_password}",
         str(directory / DUMP_NAME)],
        connection, seconds=settings.backup.tool_timeout_seconds, what="pg_restore")
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    conn = await _connect(url)
    try:
        async with conn.transaction():
            for kind, name, role in manifest.owners:
                await conn.execute(f"ALTER {kind} {await _restored_object(conn, kind, name)} "
                                   f"OWNER TO {_ident(role)}")
    finally:
        await conn.close()
    progress.step(f"pg_restore: {seconds:.1f}s")


_LOOKUP_BY_KIND: Final = {
    "SCHEMA": "to_regnamespace", "TABLE": "to_regclass", "VIEW": "to_regclass",
    "MATERIALIZED VIEW": "to_regclass", "SEQUENCE": "to_regclass",
    "FUNCTION": "to_regprocedure",
}
"""The kinds of object a backup's manifest re-owns (``dump._OWNERS_SQL``), and how each
is looked up by name."""


async def _restored_object(conn: asyncpg.Connection, kind: str, name: str) -> str:
    """The database's own spelling of the object the manifest names: the manifest is not
    authenticated, so its text is only ever a parameter of a lookup, never SQL."""
    lookup = _LOOKUP_BY_KIND.get(kind)
    if lookup is None:
        raise BackupError(f"the manifest re-owns an object of unknown kind {kind!r}")
    try:
        found = await conn.fetchval(f"SELECT {lookup}($1)::text", name)
    except asyncpg.PostgresError:
        found = None  # not even the syntax of a name
    if found is None:
        raise BackupError(f"the manifest re-owns {kind.lower()} {name!r}, which the dump "
                          "did not create")
    return str(found)


async def _ensure_role(conn: asyncpg.Connection, role: str) -> None:
    """A NOLOGIN role the restoring user is a member of (as migration 0020 makes them)."""
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    if not exists:
        await conn.execute(f"CREATE ROLE {_ident(role)} NOLOGIN")
    member = await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", role)
    if not member:
        await conn.execute(f"GRANT {_ident(role)} TO CURRENT_USER")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# -- the audit chain -----------------------------------------------------------------------


async def _check_restored_chain(store: MemoryStore, manifest: Manifest,
                                checkpoints: list[Checkpoint],
                                guardian_keys: GuardianKeys | None) -> VerifyReport:
    head = await store.head_hash()
    sequence, digest = head if head is not None else (0, b"")
    if sequence != manifest.audit_sequence or digest.hex() != manifest.audit_hash:
        raise BackupError(f"the restored audit chain ends at record {sequence}, the manifest "
                          f"says {manifest.audit_sequence}: the dump and manifest disagree")
    covered = [c for c in checkpoints if c.sequence <= sequence]
    report = await verify_with_checkpoints(store, covered, guardian_keys)
    if not report.intact:
        raise BackupError(f"the backup's audit chain does not verify: {report.problem}; "
                          "no restore event was written")
    return report


async def _append_restore_event(pool: asyncpg.Pool, manifest: Manifest,
                                checkpoints: list[Checkpoint],
                                admin: CertificateFiles) -> RestoreClaim:
    newest = max(checkpoints, key=lambda c: c.sequence, default=None)
    backup_sequence = manifest.audit_sequence
    lost_to = max(newest.sequence if newest else 0, backup_sequence)
    claim = RestoreClaim(
        backup_id=manifest.backup_id, backup_time=manifest.created_at,
        backup_sequence=backup_sequence,
        backup_hash=bytes.fromhex(manifest.audit_hash) if manifest.audit_hash else GENESIS_HASH,
        lost_from=backup_sequence + 1, lost_to=lost_to,
        guardian_checkpoint_sequence=newest.sequence if newest else 0,
        guardian_checkpoint_hash=newest.chain_head_hash if newest else b"",
        restored_by=admin.identity.spiffe_id,
    )
    await write_restore_event(pool, claim, admin)
    return claim


async def write_restore_event(pool: asyncpg.Pool, claim: RestoreClaim,
                              admin: CertificateFiles) -> MemoryRecord:
    """Append ``claim``, signed by ``admin``, at its sequence, linked to the current head
    (which must be the backup's last record)."""
    prev_hash = claim.backup_hash
    entry = restore_entry(claim, prev_hash, admin.cert.read_bytes(), admin.key.read_bytes())
    created_at = dt.datetime.now(dt.UTC)
    sequence = claim.event_sequence
    digest = chain_hash(prev_hash, sequence=sequence, tenant_id="", actor=entry.actor,
                        action=entry.action, subject=entry.subject, request_id="",
                        created_at=created_at, attributes=entry.attributes, body=entry.body)
    record = MemoryRecord(sequence, "", entry.actor, entry.action, entry.subject, "",
                          created_at, dict(entry.attributes), entry.body, prev_hash, digest,
                          100)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK_KEY)
        head = await conn.fetchval("SELECT coalesce(max(sequence), 0) FROM memory_records")
        if head != claim.backup_sequence:
            raise BackupError(f"the audit chain moved during the restore (head {head})")
        await conn.copy_records_to_table("memory_records", records=[(
            record.sequence, "", record.actor, record.action, record.subject, "",
            record.created_at, json.dumps(dict(record.attributes), sort_keys=True),
            record.body, record.prev_hash, record.hash, record.temperature, False)],
            columns=COLUMNS)
    return record


def _describe(claim: RestoreClaim) -> str:
    if claim.lost_count:
        lost = (f"records {claim.lost_from}-{claim.lost_to} written after the backup are lost "
                f"({claim.lost_count}, per the guardian's checkpoint at {claim.lost_to})")
    else:
        lost = "no guardian checkpoint covers any record after the backup"
    return f"restore event at record {claim.event_sequence}, signed by {claim.restored_by}: " \
           + lost


# -- keys, identities, checkpoints ---------------------------------------------------------


def _admin_identity(settings: Settings) -> Callable[[], CertificateFiles]:
    """How to get the operator's admin identity, which signs the restore event: checked
    now, before anything is written, and issued from the CA (a write to the home) only
    when called, once the target is known to be fit (when the home has the CA but no
    admin certificate yet, as after ``restore --keys``)."""
    try:
        files = certificate_files(settings.home, settings.trust_domain, "admin", ADMIN_NAME)
        return lambda: files
    except PKIError:
        pass
    try:
        ca = load_ca(settings.home, settings.trust_domain)
    except PKIError:
        raise BackupError(f"no federation CA in {settings.home.resolve()}: restore the key "
                          "material first (`federation restore --keys FILE`)") from None
    return lambda: ensure_identity(ca, "admin", ADMIN_NAME)


def _restore_verifier(settings: Settings) -> RestoreVerifier | None:
    return RestoreVerifier.of_home(PKIPaths(settings.home).directory, settings.trust_domain)


def _guardian_keys(settings: Settings) -> GuardianKeys | None:
    public = public_key_path(settings.home / settings.guardian.signing_key_file)
    if not public.exists():
        return None
    try:
        return load_public_keys(public)
    except ValueError as exc:  # not PEM, or a key that is not Ed25519
        raise BackupError(f"cannot read the guardian's public keys in {public}: {exc}; "
                          "restore the key material (`federation restore --keys FILE`)"
                          ) from None


def _gather_checkpoints(settings: Settings, directory: Path, guardian_log: Path | None,
                        guardian_keys: GuardianKeys | None, scratch: bool,
                        progress: Progress) -> list[Checkpoint]:
    """The backup's checkpoints, the home's log and the given log, merged; each signature
    checked with the home's guardian key; the same sequence must carry the same hash."""
    sources = [directory / CHECKPOINTS_NAME, settings.home / settings.guardian.checkpoint_file]
    if guardian_log is not None:
        if not guardian_log.is_file():
            raise BackupError(f"{guardian_log} does not exist")
        sources.append(guardian_log)
    merged: dict[int, Checkpoint] = {}
    for source in sources:
        if not source.is_file():
            continue
        for checkpoint in read_checkpoint_file(source, progress):
            if guardian_keys is not None and not checkpoint.verify(guardian_keys):
                raise BackupError(f"{source}: checkpoint {checkpoint.sequence} is not signed "
                                  "by this home's guardian key; restore the key material "
                                  "first (`federation restore --keys FILE`)")
            known = merged.get(checkpoint.sequence)
            if known is not None and known.chain_head_hash != checkpoint.chain_head_hash:
                raise BackupError(f"{source}: checkpoint {checkpoint.sequence} contradicts "
                                  "another log's: the two logs are not of one chain")
            merged.setdefault(checkpoint.sequence, checkpoint)
    if merged and guardian_keys is None and not scratch:
        raise BackupError(f"no guardian key in {settings.home.resolve()} to check the "
                          "checkpoints with: restore the key material first "
                          "(`federation restore --keys FILE`)")
    return [merged[s] for s in sorted(merged)]


def _install_home_files(settings: Settings, directory: Path, checkpoints: list[Checkpoint],
                        progress: Progress) -> None:
    """Steps 7-9: the merged checkpoint log, the deny list and the blobs into the home."""
    if checkpoints:
        _install_checkpoint_log(settings, checkpoints)
    _install_deny_list(directory / DENY_LIST_NAME, settings.home / settings.grpc.deny_list_file,
                       progress)
    _install_blobs(directory / BLOBS_DIR, settings.home / BLOBS_DIR, progress)


def _install_checkpoint_log(settings: Settings, checkpoints: list[Checkpoint]) -> None:
    path = settings.home / settings.guardian.checkpoint_file
    write_private_file(path, "".join(c.to_json() + "\n" for c in checkpoints).encode())


def _install_blobs(source: Path, target: Path, progress: Progress) -> None:
    """The backup's uploaded blobs into the home, where the broker serves them: the
    restored jobs name them as payloads and results. Content-addressed (the name is the
    SHA-256), so a blob already in the home is the same one and stays."""
    if not source.is_dir():
        return
    copied = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / path.relative_to(source)
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(path, partial)
        with partial.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, destination)
        fsync_directory(destination.parent)
        copied += 1
    progress.step(f"blobs: {copied} restored into {target}")


def _install_deny_list(source: Path, target: Path, progress: Progress) -> None:
    """The backup's deny list into a home that has none: without it, the restored
    federation's servers would accept every certificate denied before the loss. A home
    that has one keeps it (it may be newer; copy entries over with ``certs deny``)."""
    if not source.is_file():
        return
    if target.exists():
        if target.read_bytes() != source.read_bytes():
            progress.step(f"deny list: kept {target}; the backup's differs ({source})")
        return
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copyfile(source, target)
    progress.step(f"deny list: restored into {target}")
