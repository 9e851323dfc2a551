"""``federation backup``/``restore`` as an operator runs them (the real command, real
PostgreSQL): a restore into an empty external database, refusals of a non-empty one and
of damaged backups (one line, nothing written), and the key-material file."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from federation.backup import BackupError
from federation.backup.keys import read_key_file, restore_key_file, write_key_file
from federation.backup.postgres import Connection
from federation.config import BackupConfig, MemoryConfig, Settings
from federation.db import Database
from federation.guardian.checkpoints import (
    Checkpoint,
    fingerprint,
    load_signing_key,
    signed_message,
)
from federation.memory.records import AuditEntry
from federation.memory.restore_event import RestoreVerifier
from federation.memory.store import MemoryStore
from federation.pki import ADMIN_NAME, PKIError, certificate_files
from tests.db_support import database_name, fresh_database_url, started_database
from tests.support import TestPKI

PASSPHRASE = "correct horse battery staple"


async def federation(home: Path, *args: str, database_url: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env["FEDERATION_HOME"] = str(home)
    if database_url:
        env["FEDERATION_DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def backup(database: Database, tmp_path: Path) -> AsyncIterator[Path]:
    """A backup (made by the command) of a database holding three audit records."""
    store = MemoryStore(database.pool, MemoryConfig())
    await store.start()
    for number in range(3):
        await store.record(AuditEntry(actor="test", action="key.issue", subject=f"k{number}"))
    await store.stop()
    code, out, err = await federation(tmp_path / "source-home", "backup", "--out",
                                      str(tmp_path / "backup"), "--json",
                                      database_url=database.url)
    assert code == 0, err
    assert json.loads(out)["audit_sequence"] == 3
    assert "backup: snapshot of" in err  # progress for people, on stderr
    yield tmp_path / "backup"


async def test_restore_into_an_empty_external_database(
        backup: Path, pg_admin_url: str, tmp_path: Path) -> None:
    pki = TestPKI(tmp_path / "home")  # the operator's home: the CA signs the event
    async with fresh_database_url(pg_admin_url) as empty:
        code, out, err = await federation(pki.home, "restore", str(backup), "--json",
                                          database_url=empty)
        assert code == 0, err
        event = json.loads(out)["restore_event"]
        assert (event["sequence"], event["lost_count"]) == (4, 0)
        # Each step says what it does, the long chain walk before it starts.
        steps = [line.split(":")[1].strip() for line in err.splitlines()]
        assert steps.index("verifying the restored audit chain") > steps.index("pg_restore")
        async with started_database(empty) as restored:
            verifier = RestoreVerifier.of_home(pki.ca.paths.directory, pki.ca.trust_domain)
            report = await MemoryStore(restored.pool, MemoryConfig(),
                                       restore_verifier=verifier).verify_chain()
            assert report.intact, report.problem
            assert report.records_checked == 4 and len(report.restores) == 1
            # The guardian's schema is owned by its role again (the dump went in --no-owner).
            owner = await restored.pool.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'guardian'")
            assert owner == "federation_guardian"

        code, _, err = await federation(pki.home, "restore", str(backup), database_url=empty)
        assert code == 1
        assert err.count("error") == 1  # progress lines before it, then one error line
        assert err.strip().splitlines()[-1].startswith(
            f"federation: error: database {database_name(empty)!r} is not empty (")
        assert err.strip().endswith("tables); restore needs an empty database")


async def test_a_restore_that_fails_after_pg_restore_leaves_the_database_empty(
        backup: Path, pg_admin_url: str, tmp_path: Path) -> None:
    """The data is in the external database when the restored chain is checked: a chain
    the guardian's checkpoints contradict used to stay there (17 tables, no restore
    event), and every later restore was refused as "not empty". Now what the restore
    made is dropped again, and the restore can be run once more."""
    pki = TestPKI(tmp_path / "home")
    key, _ = load_signing_key(pki.home / "guardian" / "checkpoint_signing.key")
    now = dt.datetime.now(dt.UTC)
    forged = b"\x01" * 32  # a signed checkpoint of record 2 with another hash
    contradicting = tmp_path / "other-guardian.jsonl"
    contradicting.write_text(Checkpoint(
        2, forged, now, key.sign(signed_message(2, forged, now)),
        fingerprint(key.public_key())).to_json() + "\n")
    async with fresh_database_url(pg_admin_url) as empty:
        code, out, err = await federation(pki.home, "restore", str(backup),
                                          "--guardian-checkpoints", str(contradicting),
                                          database_url=empty)
        assert code == 1 and out == ""
        assert err.count("federation: error:") == 1
        assert "the backup's audit chain does not verify: record 2 does not match" in err
        assert "the external database is empty again" in err
        conn = await asyncpg.connect(empty)
        try:
            left = await conn.fetch(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON "
                "n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', "
                "'information_schema') AND n.nspname NOT LIKE 'pg\\_%'")
            schemas = await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'guardian'")
        finally:
            await conn.close()
        assert (left, schemas) == ([], 0)

        code, out, err = await federation(pki.home, "restore", str(backup), "--json",
                                          database_url=empty)
        assert code == 0, err
        assert json.loads(out)["records"] == 3


async def test_a_guardian_log_whose_last_line_was_cut_short_is_taken(
        backup: Path, pg_admin_url: str, tmp_path: Path) -> None:
    """The surviving guardian's log is passed after a crash, and a crash can cut its last
    line short. The guardian leaves such a line out when it opens the log; the restore
    refused the whole file ("not a checkpoint") and with it every checkpoint it holds."""
    pki = TestPKI(tmp_path / "home")
    key, _ = load_signing_key(pki.home / "guardian" / "checkpoint_signing.key")
    head = bytes.fromhex(json.loads((backup / "manifest.json").read_text())["audit_hash"])
    now = dt.datetime.now(dt.UTC)
    signed = Checkpoint(3, head, now, key.sign(signed_message(3, head, now)),
                        fingerprint(key.public_key())).to_json()
    log = tmp_path / "surviving-guardian.jsonl"
    log.write_text(signed + "\n" + signed.replace('"sequence": 3', '"sequence": 9')[:40])
    async with fresh_database_url(pg_admin_url) as empty:
        code, out, err = await federation(pki.home, "restore", str(backup), "--json",
                                          "--guardian-checkpoints", str(log),
                                          database_url=empty)
        assert code == 0, err
        assert f"{log}:2: left out a last line cut short" in err
        event = json.loads(out)["restore_event"]
        assert (event["sequence"], event["guardian_checkpoint_sequence"]) == (4, 3)
    log.write_text(signed[:40] + "\n" + signed + "\n")  # not the last line: refused
    code, _, err = await federation(pki.home, "restore", str(backup), "--guardian-checkpoints",
                                    str(log))
    assert code == 1 and f"{log}:1: not a checkpoint" in err


async def test_restore_puts_the_backups_blobs_back_into_the_home(
        database: Database, pg_admin_url: str, tmp_path: Path) -> None:
    """The broker serves jobs' payloads and results from ``<home>/blobs``: the backup
    copies them, and the restore must put them where the restored jobs find them."""
    data = b"an upload bigger than an inline payload"
    digest = __import__("hashlib").sha256(data).hexdigest()
    blob = Path("blobs") / "sha256" / digest[:2] / digest
    source = tmp_path / "source-home"
    (source / blob).parent.mkdir(parents=True)
    (source / blob).write_bytes(data)
    code, _, err = await federation(source, "backup", "--out", str(tmp_path / "with-blob"),
                                    database_url=database.url)
    assert code == 0, err
    assert (tmp_path / "with-blob" / blob).read_bytes() == data

    pki = TestPKI(tmp_path / "home")  # a fresh home on the new machine
    async with fresh_database_url(pg_admin_url) as empty:
        code, _, err = await federation(pki.home, "restore", str(tmp_path / "with-blob"),
                                        database_url=empty)
        assert code == 0, err
    assert (pki.home / blob).read_bytes() == data
    assert "blobs: 1 restored" in err


async def test_a_directory_at_the_partial_path_is_refused_a_killed_backups_is_replaced(
        database: Database, tmp_path: Path) -> None:
    """``backup --out B`` writes ``B.partial`` first. It deleted whatever stood there,
    someone's directory too; now only a backup killed mid-way (its mark inside) goes."""
    theirs = tmp_path / "b.partial"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    code, _, err = await federation(tmp_path / "home", "backup", "--out", str(tmp_path / "b"),
                                    database_url=database.url)
    assert code == 1 and "is not a backup in progress" in err
    assert (theirs / "notes.txt").read_text() == "mine"
    (theirs / "notes.txt").unlink()
    (theirs / ".federation-backup-in-progress").touch()  # as a killed backup leaves it
    code, _, err = await federation(tmp_path / "home", "backup", "--out", str(tmp_path / "b"),
                                    database_url=database.url)
    assert code == 0, err
    assert not theirs.exists()
    assert not (tmp_path / "b" / ".federation-backup-in-progress").exists()


async def test_restore_brings_back_the_deny_list(
        database: Database, pg_admin_url: str, tmp_path: Path) -> None:
    """``pki/denied.json`` is not in the database: a home restored without it would
    accept again every certificate denied before the loss (a stolen laptop's)."""
    source = tmp_path / "source-home"
    code, _, err = await federation(source, "certs", "deny", "--serial", "5f3a",
                                    "--reason", "laptop stolen")
    assert code == 0, err
    code, _, err = await federation(source, "backup", "--out", str(tmp_path / "b"),
                                    database_url=database.url)
    assert code == 0, err

    pki = TestPKI(tmp_path / "home")
    async with fresh_database_url(pg_admin_url) as empty:
        code, _, err = await federation(pki.home, "restore", str(tmp_path / "b"),
                                        database_url=empty)
        assert code == 0, err
    code, out, err = await federation(pki.home, "certs", "denied", "--json")
    assert code == 0, err
    assert [(d["serial"], d["reason"]) for d in json.loads(out)] == [("5f3a", "laptop stolen")]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: _corrupt(b / "database.dump"),
     "backup refused: database.dump does not match its SHA-256 in the manifest (corrupted)"),
    (lambda b: _truncate(b / "database.dump"), "backup refused: database.dump is"),
    (lambda b: (b / "database.dump").unlink(), "backup refused: database.dump is missing"),
    (lambda b: _truncate(b / "manifest.json"), "manifest.json is damaged: not valid JSON"),
    (lambda b: (b / "checkpoints.jsonl").write_text("{}\n"),
     "backup refused: checkpoints.jsonl is 3 bytes, the manifest says 0"),
    (lambda b: (b / "stray.sql").write_text("DROP TABLE memory_records;"),
     "backup refused: stray.sql is not in the manifest"),
], ids=["corrupted-dump", "truncated-dump", "missing-dump", "truncated-manifest",
        "altered-checkpoints", "extra-file"])
async def test_a_damaged_backup_is_refused_before_anything_is_written(
        backup: Path, tmp_path: Path, damage: object, message: str) -> None:
    assert callable(damage)
    damage(backup)
    home = TestPKI(tmp_path / "fresh").home
    code, out, err = await federation(home, "restore", str(backup))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (home / "postgres").exists()  # no database was even created


async def test_a_truncated_dump_with_a_matching_manifest_is_refused(
        backup: Path, tmp_path: Path) -> None:
    """A dump cut short while it was written, then checksummed: pg_restore reads its table of
    contents before anything is restored."""
    dump = backup / "database.dump"
    dump.write_bytes(dump.read_bytes()[:200])
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["files"]["database.dump"] = {
        "bytes": 200, "sha256": __import__("hashlib").sha256(dump.read_bytes()).hexdigest()}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    home = TestPKI(tmp_path / "fresh").home
    code, _, err = await federation(home, "restore", str(backup))
    assert code == 1
    assert err.startswith("federation: error: reading database.dump failed:"), err
    assert len(err.strip().splitlines()) == 1
    assert not (home / "postgres").exists()


async def test_a_refused_target_leaves_the_home_as_it_was(
        backup: Path, database: Database, tmp_path: Path) -> None:
    """docs/backup.md: nothing is written before the checks pass. The admin certificate
    that signs the restore event was issued into the home before the target database
    was found not empty."""
    pki = TestPKI(tmp_path / "home")  # a CA, no admin certificate yet

    def admin_certificate() -> bool:
        try:
            certificate_files(pki.home, pki.ca.trust_domain, "admin", ADMIN_NAME)
        except PKIError:
            return False
        return True

    assert not admin_certificate()
    code, _, err = await federation(pki.home, "restore", str(backup), database_url=database.url)
    assert code == 1 and "is not empty" in err
    assert not admin_certificate()


async def test_a_manifest_cannot_smuggle_sql_into_the_restore(
        backup: Path, pg_admin_url: str, tmp_path: Path) -> None:
    """The manifest is not authenticated: the objects it re-owns were pasted into
    ``ALTER … OWNER`` as SQL, and one statement could carry another."""
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["owners"] = [["TABLE", "memory_records OWNER TO federation_guardian; "
                           "CREATE TABLE smuggled (x int); --", "federation_guardian"]]
    (backup / "manifest.json").write_text(json.dumps(manifest))
    async with fresh_database_url(pg_admin_url) as empty:
        code, _, err = await federation(TestPKI(tmp_path / "fresh").home, "restore",
                                        str(backup), database_url=empty)
        assert code == 1 and "which the dump did not create" in err, err
        conn = await asyncpg.connect(empty)
        try:
            assert await conn.fetchval("SELECT to_regclass('smuggled')") is None
        finally:
            await conn.close()


def _settings(home: Path) -> Settings:
    # 2^14 keeps the test fast; the default (2^17) is measured in docs/backup.md.
    return Settings(home=home, backup=BackupConfig(scrypt_log2_n=14))


def test_key_material_round_trips_and_refuses_a_wrong_passphrase(tmp_path: Path) -> None:
    source = _settings(TestPKI(tmp_path / "source").home)
    for name in ("gateway/wrapping.key", "guardian/wrapping.key",
                 "guardian/checkpoint_signing.key"):
        (source.home / name).parent.mkdir(parents=True, exist_ok=True)
        (source.home / name).write_bytes(os.urandom(32))
    key_file = tmp_path / "offsite" / "federation.keys"
    summary = write_key_file(source, key_file, PASSPHRASE)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "pki/ca.key" in summary.files and "guardian/wrapping.key" in summary.files
    assert b"BEGIN" not in key_file.read_bytes()  # nothing in the clear

    with pytest.raises(BackupError, match="does not open: wrong passphrase"):
        read_key_file(key_file, PASSPHRASE + "!")
    with pytest.raises(BackupError, match="already exists"):
        write_key_file(source, key_file, PASSPHRASE)
    with pytest.raises(BackupError, match="at least 12 characters"):
        write_key_file(source, tmp_path / "other.keys", "short")
    (source.home / "backups" / "b1").mkdir(parents=True)
    with pytest.raises(BackupError, match="next to the database backups"):
        write_key_file(source, source.home / "backups" / "b1" / "keys", PASSPHRASE)

    target = _settings(tmp_path / "fresh")
    restore_key_file(target, key_file, PASSPHRASE)
    for name in summary.files:
        assert (target.home / name).read_bytes() == (source.home / name).read_bytes()
    assert stat.S_IMODE((target.home / "guardian/wrapping.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((target.home / "pki/ca.key").stat().st_mode) == 0o600

    other = _settings(TestPKI(tmp_path / "another").home)
    with pytest.raises(BackupError, match=r"ca\.key already exists and differs"):
        restore_key_file(other, key_file, PASSPHRASE)


def test_an_altered_key_file_does_not_open(tmp_path: Path) -> None:
    source = _settings(TestPKI(tmp_path / "source").home)
    key_file = tmp_path / "federation.keys"
    write_key_file(source, key_file, PASSPHRASE)
    document = json.loads(key_file.read_text())
    document["kdf"]["log2_n"] = 15  # the header is authenticated too
    key_file.write_text(json.dumps(document))
    with pytest.raises(BackupError, match="does not open"):
        read_key_file(key_file, PASSPHRASE)


async def test_a_password_in_the_url_parameters_stays_off_the_command_line(
        database: Database, tmp_path: Path) -> None:
    """libpq takes a password as a URL parameter too (``?password=…``). Only the one in
    the user part was moved into PGPASSWORD: a ``password=`` parameter stayed in the
    ``--dbname`` of pg_dump and pg_restore, visible to every user in
    /proc/PID/cmdline. Now both go into the environment, and the backup still works."""
    parts = urlsplit(database.url)
    secret = parts.password or ""
    assert secret
    url = urlunsplit(parts._replace(
        netloc=f"{parts.username}@{parts.hostname}:{parts.port}",
        query=f"{parts.query}&password={quote(secret)}"))
    connection = Connection.of(url)
    assert secret not in connection.dsn_without_password
    assert connection.password == secret
    assert "sslmode=prefer" in connection.dsn_without_password  # the other options stay
    code, out, err = await federation(tmp_path / "home", "backup", "--out",
                                      str(tmp_path / "b"), "--json", database_url=url)
    assert code == 0, err
    assert json.loads(out)["files"]["database.dump"]["bytes"] > 0


def test_key_material_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    """The file records its trust domain, but the restore did not look: a home set up
    for another one took the CA, then issued identities of its own domain under it (the
    edge CA's name constraints name the old one, so no device could connect)."""
    source = _settings(TestPKI(tmp_path / "source").home)
    key_file = tmp_path / "federation.keys"
    write_key_file(source, key_file, PASSPHRASE)
    other = Settings(home=tmp_path / "other", trust_domain="other.example",
                     backup=BackupConfig(scrypt_log2_n=14))
    with pytest.raises(BackupError, match=re.escape(
            "trust domain 'federation.local', and this home's is 'other.example'")):
        restore_key_file(other, key_file, PASSPHRASE)
    assert not other.home.exists()  # nothing written
    restore_key_file(_settings(tmp_path / "same"), key_file, PASSPHRASE)


def _with_file_size_limit(limit: int) -> None:
    """In the child: writes past ``limit`` bytes are cut short, then fail (EFBIG), as on a
    disk that fills up; SIGXFSZ ignored so that the process sees the error."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_key_file_cut_short_is_an_error_not_a_backup(tmp_path: Path) -> None:
    """One write(2) may write less than asked and still succeed: the key file was
    written with one unchecked os.write, so on a filling disk `backup --keys` printed
    "encrypted into ... (0600)", exited 0, and left 2000 of its 6000 bytes, which no
    passphrase opens."""
    home = TestPKI(tmp_path / "home").home
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    out = tmp_path / "offsite" / "federation.keys"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDERATION_")}
    env |= {"FEDERATION_HOME": str(home), "FEDERATION_BACKUP_SCRYPT_LOG2_N": "14"}
    command = [sys.executable, "-m", "federation.cli", "backup", "--keys", "--out", str(out),
               "--passphrase-file", str(passphrase)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          check=False, preexec_fn=lambda: _with_file_size_limit(2000))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"federation: error: File too large: {out}"], done.stderr
    assert not out.exists()  # nothing that looks like a key backup
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert read_key_file(out, PASSPHRASE)


async def test_unreadable_guardian_keys_or_passphrase_are_one_line(
        backup: Path, tmp_path: Path) -> None:
    """Two inputs an operator hands over that ended in a traceback: a guardian ``.pub``
    that is not PEM (a restore), and a passphrase file that is not UTF-8 text."""
    home = TestPKI(tmp_path / "home").home
    public = home / "guardian" / "checkpoint_signing.key.pub"
    public.parent.mkdir(parents=True)
    public.write_text("not a key\n")
    code, _, err = await federation(home, "restore", "--scratch", str(backup))
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"federation: error: cannot read the guardian's public keys in {public}: {public} "
        "holds no PEM public key; restore the key material (`federation restore --keys "
        "FILE`)")
    passphrase = tmp_path / "passphrase"
    passphrase.write_bytes(b"\xff\xfe latin-1 bytes\n")
    code, _, err = await federation(home, "backup", "--keys", "--out",
                                    str(tmp_path / "federation.keys"), "--passphrase-file",
                                    str(passphrase))
    assert code == 1 and err.strip().splitlines() == [
        f"federation: error: {passphrase}: the passphrase file is not UTF-8 text"], err
