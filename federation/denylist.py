"""The deny list: certificates every node refuses, by serial number or by identity.

A compromised node or operator certificate is valid until it expires, and TLS
accepts it. Until it is replaced (a new key and certificate issued, the old one
left to expire), every federation server must refuse it: the interceptor asks
:meth:`DenyList.refusal` on every call, after TLS and before authorization.

It is a small JSON file (``grpc.deny_list_file``, default
``$FEDERATION_HOME/pki/denied.json``) written by ``federation certs deny`` and
copied to every host, independent of how certificates are issued::

    {"denied": [{"serial": "5f3a…", "reason": "laptop stolen", "at": "2026-…"},
                {"identity": "spiffe://federation.local/node/lab/admin", "reason": "…"}]}

A serial (hexadecimal) denies one certificate; an identity denies every
certificate of that SPIFFE id, replacements included, until the entry is removed.
Servers reload the file when it changes (its mtime and size are looked at no
more than every ``grpc.deny_list_reload_seconds``), without a restart. A file
that cannot be read or parsed at start stops the server with one line; later,
the last good list stays in force and the error is logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.pki import PKIError, write_private_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Denial:
    serial: str = ""
    """Lower-case hexadecimal, no separators; empty for an identity entry."""
    identity: str = ""
    """A SPIFFE id; empty for a serial entry."""
    reason: str = ""
    at: str = ""

    def as_json(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


def normalize_serial(text: str) -> str:
    """``5F:3A:…``, ``0x5f3a…`` or a decimal-looking hex string, as lower-case hex."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return format(int(cleaned, 16), "x")
    except ValueError:
        raise PKIError(f"{text!r} is not a certificate serial number (hexadecimal)") from None


def read_denials(path: Path) -> list[Denial]:
    """The file's entries; an absent file denies nothing. PKIError when malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise PKIError(f"deny list {path}: cannot read it: {exc}") from exc
    entries = data.get("denied") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise PKIError(f'deny list {path}: expected {{"denied": [...]}}')
    denials = []
    for entry in entries:
        if not isinstance(entry, dict) or not (entry.get("serial") or entry.get("identity")):
            raise PKIError(f"deny list {path}: each entry needs a serial or an identity: {entry}")
        serial = normalize_serial(str(entry["serial"])) if entry.get("serial") else ""
        denials.append(Denial(serial, str(entry.get("identity", "")),
                              str(entry.get("reason", "")), str(entry.get("at", ""))))
    return denials


def write_denials(path: Path, denials: list[Denial]) -> None:
    body: dict[str, Any] = {"denied": [d.as_json() for d in denials]}
    write_private_file(path, (json.dumps(body, indent=2) + "\n").encode())


def add_denial(path: Path, *, serial: str = "", identity: str = "", reason: str) -> Denial:
    """Deny ``serial`` or ``identity`` (exactly one, not blank) for ``reason`` (not blank).

    Checked before the file is written: an entry naming nothing would make the whole list
    unreadable, and every node would keep its previous list (or refuse to start)."""
    serial, identity, reason = serial.strip(), identity.strip(), reason.strip()
    if bool(serial) == bool(identity):
        raise PKIError("a denial names one certificate serial or one identity, not blank")
    if not reason:
        raise PKIError("a denial needs a reason: it is kept with the entry and given with "
                       "every refusal")
    denial = Denial(normalize_serial(serial) if serial else "", identity, reason,
                    dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    denials = [d for d in read_denials(path)
               if (d.serial, d.identity) != (denial.serial, denial.identity)]
    write_denials(path, [*denials, denial])
    return denial


def remove_denial(path: Path, what: str) -> int:
    """Remove the entries naming ``what`` (a serial or an identity); how many there were."""
    denials = read_denials(path)
    key = what if what.startswith("spiffe://") else normalize_serial(what)
    kept = [d for d in denials if key not in (d.serial, d.identity)]
    write_denials(path, kept)
    return len(denials) - len(kept)


class DenyList:
    """The servers' view of the file, reloaded when it changes."""

    def __init__(self, path: Path, reload_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._reload_seconds = reload_seconds
        self._clock = clock
        self._serials: dict[str, Denial] = {}
        self._identities: dict[str, Denial] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = clock()
        self._load(read_denials(path))  # a malformed file at start is the operator's to fix
        self._stamp = self._file_stamp()

    def refusal(self, serial: int, identity: str) -> str | None:
        """Why a certificate (its serial number, its SPIFFE id) is refused, or ``None``."""
        self._maybe_reload()
        if not self._serials and not self._identities:
            return None
        denial = self._serials.get(format(serial, "x")) or self._identities.get(identity)
        if denial is None:
            return None
        what = f"certificate serial {format(serial, 'x')}" if denial.serial else \
            f"identity {identity}"
        because = f" ({denial.reason})" if denial.reason else ""
        return f"{what} is denied{because}: use a replacement certificate"

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < self._reload_seconds:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            denials = read_denials(self.path)
        except PKIError as exc:
            log.error("deny list not reloaded; the previous one stays in force",
                      extra={"error": str(exc)})
            return
        self._stamp = stamp
        self._load(denials)
        log.info("deny list reloaded", extra={"entries": len(denials)})

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _load(self, denials: list[Denial]) -> None:
        self._serials = {d.serial: d for d in denials if d.serial}
        self._identities = {d.identity: d for d in denials if d.identity}
