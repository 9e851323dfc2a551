"""The key material in one file, encrypted with an operator's passphrase.

What it holds (relative to the home): the CA (the root ``pki/ca.pem`` and, unless it
was moved offline, ``pki/ca.key``; the intermediates ``pki/nodes-ca.*`` and
``pki/edge-ca.*``: every identity of the federation, devices' included, chains to
them), the gateway's and the
guardian's wrapping keys (each unwraps one share of every vault secret) and the
guardian's checkpoint signing key (with its public half). None of it is in the
database, and it must not sit next to a database backup: the two together undo the
vault's 2-of-3 split.

Encryption: scrypt (memory-hard: N = 2^``scrypt_log2_n``, r = 8, p = 1) derives a
256-bit key from the passphrase and a random salt; AES-256-GCM seals the files, with
the file's header (format, KDF parameters, salt, nonce) as associated data, so any
change to the header or the ciphertext, and any wrong passphrase, fails as one
"does not open" error. The file is created 0600 and never overwrites another.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from federation.backup import BackupError
from federation.backup.manifest import MANIFEST_NAME
from federation.config import Settings
from federation.durable import write_all
from federation.pki import EDGE, NODES, PKIPaths, write_private_file

FORMAT: Final = "federation-keys/1"
MAX_LOG2_N: Final = 20
"""Refuse files asking for more than 2^20 (1 GiB of memory with r = 8)."""
_R: Final = 8
_P: Final = 1
_PUBLIC_SUFFIXES: Final = (".pub", ".pem")


@dataclass(frozen=True)
class KeyFileSummary:
    path: Path
    files: list[str]
    """Relative paths of the files inside (or, on restore, written or already there)."""


def key_material_paths(settings: Settings) -> list[str]:
    """What is backed up, relative to the home."""
    pki = PKIPaths(Path("."))
    signing = settings.guardian.signing_key_file
    intermediates = [path(kind).as_posix() for kind in (NODES, EDGE)
                     for path in (pki.intermediate_cert, pki.intermediate_key)]
    return [pki.ca_cert.as_posix(), pki.ca_key.as_posix(), *intermediates,
            settings.vault.wrapping_key_file, settings.guardian.wrapping_key_file, signing,
            signing + ".pub"]


def _derive(passphrase: str, salt: bytes, log2_n: int) -> bytes:
    if not 14 <= log2_n <= MAX_LOG2_N:
        raise BackupError(f"the key file asks for scrypt N = 2^{log2_n}, outside 2^14..2^20")
    return Scrypt(salt=salt, length=32, n=2 ** log2_n, r=_R, p=_P).derive(passphrase.encode())


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def write_key_file(settings: Settings, out: Path, passphrase: str) -> KeyFileSummary:
    """Encrypt the home's key material into ``out`` (new file, 0600)."""
    check_passphrase(passphrase, settings.backup.min_passphrase_chars)
    _refuse_next_to_backup(settings, out)
    files: dict[str, dict[str, Any]] = {}
    for name in key_material_paths(settings):
        path = settings.home / name
        if path.is_file():
            files[name] = {"mode": path.stat().st_mode & 0o777,
                           "data": base64.b64encode(path.read_bytes()).decode()}
    if PKIPaths(Path(".")).intermediate_key(NODES).as_posix() not in files:
        raise BackupError(f"no federation CA under {settings.home / 'pki'}: nothing to back up")
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = {
        "format": FORMAT, "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "trust_domain": settings.trust_domain,
        "kdf": {"name": "scrypt", "log2_n": settings.backup.scrypt_log2_n, "r": _R, "p": _P,
                "salt": base64.b64encode(salt).decode()},
        "cipher": "AES-256-GCM", "nonce": base64.b64encode(nonce).decode(),
    }
    key = _derive(passphrase, salt, settings.backup.scrypt_log2_n)
    plaintext = json.dumps({"files": files}, sort_keys=True).encode()
    sealed = AESGCM(key).encrypt(nonce, plaintext, _aad(header))
    document = dict(header, ciphertext=base64.b64encode(sealed).decode())
    _create_private(out, json.dumps(document, indent=2).encode() + b"\n")
    return KeyFileSummary(out, sorted(files))


def read_key_file(path: Path, passphrase: str, trust_domain: str | None = None
                  ) -> dict[str, tuple[int, bytes]]:
    """The files inside ``path`` (relative path -> mode, content); with ``trust_domain``,
    refused unless they are that trust domain's."""
    try:
        document = json.loads(path.read_bytes())
        header = {k: v for k, v in document.items() if k != "ciphertext"}
        if header.get("format") != FORMAT:
            raise BackupError(f"{path} is not a {FORMAT} key file")
        kdf = header["kdf"]
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
        sealed = base64.b64decode(document["ciphertext"], validate=True)
        log2_n = int(kdf["log2_n"])
        if kdf.get("name") != "scrypt" or (kdf.get("r"), kdf.get("p")) != (_R, _P):
            raise BackupError(f"{path}: unsupported key derivation {kdf!r}")
    except FileNotFoundError:
        raise BackupError(f"{path} does not exist") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackupError(f"{path} is damaged: {exc}") from None
    key = _derive(passphrase, salt, log2_n)
    try:
        plaintext = AESGCM(key).decrypt(nonce, sealed, _aad(header))
    except InvalidTag:
        raise BackupError(f"{path} does not open: wrong passphrase, or the file was altered"
                          ) from None
    # Checked once the header is authenticated (it is the cipher's associated data).
    if trust_domain is not None and header.get("trust_domain") != trust_domain:
        raise BackupError(f"{path} holds the key material of trust domain "
                          f"{header.get('trust_domain')!r}, and this home's is {trust_domain!r}: "
                          "set trust_domain in its federation.toml to restore it here")
    files = json.loads(plaintext)["files"]
    return {name: (int(entry["mode"]), base64.b64decode(entry["data"]))
            for name, entry in files.items()}


def restore_key_file(settings: Settings, path: Path, passphrase: str) -> KeyFileSummary:
    """Put the key material of ``path`` into the home. Refuses, before writing anything,
    when the home already holds a different file at one of those paths."""
    files = read_key_file(path, passphrase, settings.trust_domain)
    home = settings.home
    for name, (_, data) in sorted(files.items()):
        _check_relative(name)
        target = home / name
        if target.exists() and target.read_bytes() != data:
            raise BackupError(f"{target} already exists and differs from the backup; "
                              "restore the keys into a fresh home")
    for name, (_, data) in sorted(files.items()):
        target = home / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if name.endswith(_PUBLIC_SUFFIXES):  # certificates and public keys
            target.write_bytes(data)
            target.chmod(0o644)
        else:
            write_private_file(target, data)
    return KeyFileSummary(path, sorted(files))


def check_passphrase(passphrase: str, minimum: int) -> None:
    if len(passphrase) < minimum:
        raise BackupError(f"the passphrase must have at least {minimum} characters")


def _check_relative(name: str) -> None:
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        raise BackupError(f"the key file names a path outside the home: {name}")


def _refuse_next_to_backup(settings: Settings, out: Path) -> None:
    """The keys must not land beside a database backup (the whole point of a separate file)."""
    parent = out.resolve().parent
    backups = (settings.home / settings.backup.directory).resolve()
    if parent == backups or backups in parent.parents or (parent / MANIFEST_NAME).exists():
        raise BackupError(f"{out} is next to the database backups; keep the key material "
                          "elsewhere (another disk, a secrets manager)")


def _create_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupError(f"{path} already exists; choose a new file") from None
    try:
        write_all(fd, data, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # ours (O_EXCL): no truncated key file left behind
        raise
    os.close(fd)
