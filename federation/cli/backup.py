"""``federation backup`` and ``federation restore`` (see ``docs/backup.md``).

Progress goes to stderr, one line per step; ``--json`` prints the result on stdout for
scripts; a failure is one line and a non-zero exit. Passphrases come from a prompt or
``--passphrase-file``, never from the command line (``ps`` shows it to everyone).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from federation.backup import BackupError
from federation.backup.dump import Progress, create_backup, latest_backup
from federation.backup.keys import restore_key_file, write_key_file
from federation.backup.restore import restore_backup
from federation.cli.support import print_json
from federation.config import Settings
from federation.errors import CommandError

_PASSPHRASE_HELP = "read the passphrase from the first line of FILE (default: prompt)"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    backup = subparsers.add_parser(
        "backup", help="back up the database (pg_dump + manifest), or with --keys the key "
                       "material (encrypted with a passphrase)")
    backup.add_argument("--out", help="the backup directory (default: "
                                      "$FEDERATION_HOME/backups/backup-<UTC time>); with "
                                      "--keys: the key file to create (required)")
    backup.add_argument("--keys", action="store_true",
                        help="back up the key material instead (CA, wrapping and signing keys)")
    backup.add_argument("--passphrase-file", metavar="FILE", help=_PASSPHRASE_HELP)
    backup.add_argument("--json", action="store_true")
    backup.set_defaults(handler=backup_command)

    restore = subparsers.add_parser(
        "restore", help="restore a backup into a fresh home or an empty external database, "
                        "or with --keys the key material into the home")
    restore.add_argument("backup_dir", nargs="?", metavar="BACKUP_DIR",
                         help="a backup directory, or `latest`: the newest one under the "
                              "backup directory ($FEDERATION_HOME/backups by default)")
    restore.add_argument("--keys", metavar="FILE", help="restore the key material from FILE")
    restore.add_argument("--passphrase-file", metavar="FILE", help=_PASSPHRASE_HELP)
    restore.add_argument(
        "--guardian-checkpoints", metavar="FILE",
        help="the guardian's current checkpoint log (guardian/checkpoints.jsonl of the home "
             "or host that survived): names exactly which records the restore loses")
    restore.add_argument("--scratch", action="store_true",
                         help="restore test: restore into a temporary database, verify the "
                              "audit chain, delete it; the home is not changed")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(handler=restore_command)


async def backup_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.keys:
            return _backup_keys(settings, args)
        if args.passphrase_file:
            raise CommandError("--passphrase-file is for --keys")
        path, manifest = await create_backup(
            settings, Path(args.out) if args.out else None, Progress("backup"))
    except BackupError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json({"path": str(path), **manifest.to_json()})
    else:
        print(path)
    return 0


def _backup_keys(settings: Settings, args: argparse.Namespace) -> int:
    if not args.out:
        raise CommandError("--keys needs --out FILE: where the encrypted key file goes "
                           "(not next to the database backups)")
    summary = write_key_file(settings, Path(args.out), _passphrase(args, confirm=True))
    Progress("backup").step(f"key material ({len(summary.files)} files) encrypted into "
                            f"{summary.path} (0600)")
    if args.json:
        print_json({"path": str(summary.path), "files": summary.files})
    else:
        print(summary.path)
    return 0


async def restore_command(settings: Settings, args: argparse.Namespace) -> int:
    if bool(args.keys) == bool(args.backup_dir):
        raise CommandError("name either a BACKUP_DIR or --keys FILE")
    try:
        if args.keys:
            summary = restore_key_file(settings, Path(args.keys), _passphrase(args, False))
            Progress("restore").step(f"key material restored into {settings.home.resolve()}: "
                                     + ", ".join(summary.files))
            if args.json:
                print_json({"home": str(settings.home.resolve()), "files": summary.files})
            return 0
        directory = (latest_backup(settings) if args.backup_dir == "latest"
                     else Path(args.backup_dir))
        result = await restore_backup(
            settings, directory, Progress("restore"),
            guardian_log=Path(args.guardian_checkpoints) if args.guardian_checkpoints
            else None, scratch=args.scratch)
    except BackupError as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print_json(result.to_json())
    return 0


def _passphrase(args: argparse.Namespace, confirm: bool) -> str:
    if args.passphrase_file:
        try:
            text = Path(args.passphrase_file).read_bytes().decode()
        except UnicodeDecodeError:
            raise CommandError(f"{args.passphrase_file}: the passphrase file is not UTF-8 "
                               "text") from None
        return text.splitlines()[0] if text else ""
    if not sys.stdin.isatty():
        raise CommandError("no terminal to ask for the passphrase: use --passphrase-file FILE")
    first = getpass.getpass("passphrase for the key material: ")
    if confirm and getpass.getpass("the same passphrase again: ") != first:
        raise CommandError("the two passphrases differ")
    return first
