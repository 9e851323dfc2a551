"""``federation certs``: deny a certificate everywhere until it is replaced
(docs/runbooks/key-or-certificate-compromised.md), and read a certificate's serial."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509

from federation.cli.support import print_json
from federation.config import Settings
from federation.denylist import add_denial, normalize_serial, read_denials, remove_denial
from federation.errors import CommandError
from federation.pki import EDGE, NODES, PKIPaths, parse_spiffe_id


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    certs = subparsers.add_parser(
        "certs", help="the deny list every node enforces; a certificate's serial")
    commands = certs.add_subparsers(dest="certs_command", required=True, metavar="COMMAND")
    deny = commands.add_parser("deny", help="refuse a certificate (or an identity) everywhere")
    which = deny.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="the certificate's serial number (hexadecimal)")
    which.add_argument("--cert", type=Path, help="a PEM file of the certificate to deny")
    which.add_argument("--identity", help="a SPIFFE id: every certificate of it, replacements "
                                          "included, until allowed again")
    deny.add_argument("--reason", required=True)
    deny.add_argument("--json", action="store_true")
    deny.set_defaults(handler=deny_certificate)
    allow = commands.add_parser("allow", help="remove a serial or identity from the deny list")
    allow.add_argument("what", help="a serial (hexadecimal) or a SPIFFE id")
    allow.add_argument("--json", action="store_true")
    allow.set_defaults(handler=allow_certificate)
    denied = commands.add_parser("denied", help="list the deny list")
    denied.add_argument("--json", action="store_true")
    denied.set_defaults(handler=list_denied)
    show = commands.add_parser("show", help="a certificate's serial, identity and expiry")
    show.add_argument("cert", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=show_certificate)


def _path(settings: Settings) -> Path:
    return settings.home / settings.grpc.deny_list_file


def _read(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CommandError(f"{path}: not a PEM certificate: {exc}") from exc


def _identity(cert: x509.Certificate) -> str:
    """The leaf's SPIFFE id; empty for a CA certificate (it has no SAN)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else ""


def _refuse_authority(settings: Settings, serial: str, cert: x509.Certificate | None) -> None:
    """A CA's serial on the deny list refuses nobody: servers compare it with the serial of
    the certificate a caller presents, never with the CAs above it. Said at once, rather
    than reported as denied while every certificate it signed is still accepted."""
    paths = PKIPaths(settings.home)
    named = {"the root CA": paths.ca_cert, "the nodes CA": paths.intermediate_cert(NODES),
             "the edge CA": paths.intermediate_cert(EDGE)}
    wanted = normalize_serial(serial)
    which = next((name for name, path in named.items()
                  if path.is_file() and format(_read(path).serial_number, "x") == wanted), None)
    if which is None and cert is not None and _is_authority(cert):
        which = "a certificate authority"
    if which is not None:
        raise CommandError(
            f"serial {wanted} is {which}'s: the deny list refuses the certificates callers "
            "present, not the CAs that signed them, so this would deny nobody; for a "
            "compromised CA key see docs/runbooks/key-or-certificate-compromised.md (Limits)")


def _is_authority(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


async def deny_certificate(settings: Settings, args: argparse.Namespace) -> int:
    serial, identity = args.serial or "", args.identity or ""
    cert = _read(args.cert) if args.cert is not None else None
    if cert is not None:
        serial = format(cert.serial_number, "x")
    if serial.strip():
        _refuse_authority(settings, serial, cert)
    if identity:
        parse_spiffe_id(identity, settings.trust_domain)  # a typo would deny nobody
    denial = add_denial(_path(settings), serial=serial, identity=identity, reason=args.reason)
    if args.json:
        print_json(denial.as_json())
    else:
        what = f"serial {denial.serial}" if denial.serial else f"identity {denial.identity}"
        print(f"denied {what} in {_path(settings)}; every server on this host refuses it "
              f"within {settings.grpc.deny_list_reload_seconds:g}s. Copy the file to every "
              "other host, then issue a replacement (federation pki issue).")
    return 0


async def allow_certificate(settings: Settings, args: argparse.Namespace) -> int:
    removed = remove_denial(_path(settings), args.what)
    if not removed:
        raise CommandError(f"{args.what} is not on the deny list")
    if args.json:
        print_json({"allowed": args.what, "entries_removed": removed})
    else:
        print(f"allowed {args.what} again")
    return 0


async def list_denied(settings: Settings, args: argparse.Namespace) -> int:
    denials = read_denials(_path(settings))
    if args.json:
        print_json([d.as_json() for d in denials])
        return 0
    for d in denials:
        print(f"{d.serial or d.identity:<48} {d.at:<21} {d.reason}")
    print(f"{len(denials)} denied ({_path(settings)})")
    return 0


async def show_certificate(settings: Settings, args: argparse.Namespace) -> int:
    cert = _read(args.cert)
    facts = {"serial": format(cert.serial_number, "x"), "identity": _identity(cert),
             "not_after": cert.not_valid_after_utc.isoformat()}
    if args.json:
        print_json(facts)
    else:
        print("\n".join(f"{k:<9} {v}" for k, v in facts.items()))
    return 0
