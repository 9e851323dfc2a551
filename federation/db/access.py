"""Who may reach the embedded PostgreSQL, and over what: TLS files and ``pg_hba.conf``.

By default the embedded server listens on loopback and ``initdb`` wrote what it
needs. A database *host* (the multi-host test's, or a small deployment's) listens on
its network address: it gets a server certificate from the federation's nodes CA
(``federation pki bundle --roles postgres``), TLS 1.3 only, and the listed networks may
connect with ``hostssl`` (TLS required, SCRAM passwords) and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from federation.pki import write_private_file

_HBA_BEGIN, _HBA_END = "# federation: networks (begin)", "# federation: networks (end)"


def configure_access(data_dir: Path, tls: tuple[Path, Path] | None,
                     networks: tuple[str, ...], run_as: Any) -> None:
    """Copy the TLS files into the data directory (the server's user must own its key,
    0600) and write the allowed networks into ``pg_hba.conf``, replacing what an earlier
    start wrote. ``run_as``: the ``pwd`` entry of the server's user, when root starts it."""
    if tls is not None:
        for source, name in zip(tls, ("server.crt", "server.key"), strict=True):
            target = data_dir / name
            write_private_file(target, source.read_bytes())
            if run_as is not None:
                os.chown(target, run_as.pw_uid, run_as.pw_gid)
    hba = data_dir / "pg_hba.conf"
    text = hba.read_text()
    if _HBA_BEGIN in text:
        text = text.split(_HBA_BEGIN)[0] + text.split(_HBA_END, 1)[1].lstrip("\n")
    kind = "hostssl" if tls is not None else "host"
    lines = [f"{kind} all all {network} scram-sha-256" for network in networks]
    if lines:
        text = text.rstrip("\n") + "\n" + "\n".join([_HBA_BEGIN, *lines, _HBA_END]) + "\n"
    hba.write_text(text)


def tls_arguments(tls: tuple[Path, Path] | None) -> list[str]:
    """The postmaster's TLS settings (files relative to the data directory)."""
    if tls is None:
        return []
    return ["-c", "ssl=on", "-c", "ssl_cert_file=server.crt", "-c", "ssl_key_file=server.key",
            "-c", "ssl_min_protocol_version=TLSv1.3"]
