"""``federation pki …``: the federation's certificate authority.

    federation pki init [--force]
    federation pki issue --role ROLE --name NAME [--dns D] [--ip A]
    federation pki bundle --host NAME --roles R1,R2 [--dns D] [--ip A] --out FILE
    federation pki install FILE
    federation pki renew [--within DAYS | --all]
    federation pki renew --host NAME --out FILE
    federation pki renew --intermediate nodes|edge --root-key FILE
    federation pki migrate
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from federation.cli.arguments import days, ip_address
from federation.cli.support import print_json
from federation.config import ALL_ROLES, Settings
from federation.errors import CommandError
from federation.pki import (
    EDGE,
    NODES,
    CertificateAuthority,
    CertificateFiles,
    NoIssuerKey,
    load_ca,
    migrate_legacy,
    renew_identities,
)
from federation.pki.bundle import (
    BundleSpec,
    build_bundle,
    install_bundle,
    recall_spec,
    remember_spec,
    spec_from_args,
    write_bundle,
)


def register(commands: Any) -> None:
    pki = commands.add_parser("pki", help="the federation's certificate authority")
    sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create a root CA and the nodes and edge intermediates")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--json", action="store_true")
    init.set_defaults(handler=_pki_init)
    issue = sub.add_parser("issue", help="issue a certificate for a node, operator or device")
    issue.add_argument("--role", required=True, choices=ALL_ROLES)
    issue.add_argument("--name", required=True)
    _add_names(issue)
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(handler=_pki_issue)
    _register_bundle(sub)
    _register_renew(sub)
    migrate = sub.add_parser("migrate", help="replace a single-CA PKI (from before "
                             "intermediates) with a root and intermediates")
    migrate.add_argument("--json", action="store_true")
    migrate.set_defaults(handler=_pki_migrate)


def _add_names(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dns", action="append", default=[], help="DNS name (repeatable)")
    parser.add_argument("--ip", action="append", default=[], type=ip_address,
                        help="IP address (repeatable)")


def _register_bundle(sub: Any) -> None:
    bundle = sub.add_parser("bundle", help="one archive with exactly what a host needs")
    bundle.add_argument("--host", required=True, help="the host's name (its identities' name)")
    bundle.add_argument("--roles", required=True, help="comma-separated roles the host runs")
    _add_names(bundle)
    bundle.add_argument("--out", required=True, help="archive to create (0600, never replaced)")
    bundle.add_argument("--json", action="store_true")
    bundle.set_defaults(handler=_pki_bundle)
    install = sub.add_parser("install", help="unpack a host bundle into this home")
    install.add_argument("archive")
    install.add_argument("--json", action="store_true")
    install.set_defaults(handler=_pki_install)


def _register_renew(sub: Any) -> None:
    renew = sub.add_parser(
        "renew", help="reissue this home's certificates close to expiry (running nodes "
                      "reload them), a host's bundle, or an intermediate")
    renew.add_argument("--within", type=days,
                       help="renew what expires within this many days (default: "
                            "pki.renew_within_days); 0 renews nothing, 36500 (a century) all")
    renew.add_argument("--all", action="store_true", help="renew every certificate now")
    renew.add_argument("--host", help="issue this host's bundle again (needs --out)")
    renew.add_argument("--out", help="with --host: the new archive")
    renew.add_argument("--intermediate", choices=(NODES, EDGE),
                       help="re-sign an intermediate (same key) with the root key")
    renew.add_argument("--root-key", help="with --intermediate: the root key file")
    renew.add_argument("--json", action="store_true")
    renew.set_defaults(handler=_pki_renew)


def _ca(settings: Settings) -> CertificateAuthority:
    return load_ca(settings.home, settings.trust_domain, settings.pki)


async def _pki_init(settings: Settings, args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(settings.home, settings.trust_domain, force=args.force,
                                   config=settings.pki)
    paths = ca.paths
    if args.json:
        print_json({"ca_cert": str(paths.ca_cert.resolve()), "trust_domain": ca.trust_domain,
                    "root_key": str(paths.ca_key.resolve()),
                    "intermediates": {k: str(paths.intermediate_cert(k).resolve())
                                      for k in (NODES, EDGE)}})
    else:
        print(f"created the federation root CA {paths.ca_cert} (trust domain "
              f"{ca.trust_domain}) and the {NODES} and {EDGE} intermediates\n"
              f"the root key {paths.ca_key} is needed only to renew an intermediate: "
              "keep it offline")
    return 0


async def _pki_issue(settings: Settings, args: argparse.Namespace) -> int:
    files = _ca(settings).issue(
        args.role,
        args.name,
        dns_names=("localhost", *args.dns),
        ip_addresses=("127.0.0.1", "::1", *args.ip),
    )
    _print_files(files, args.json)
    return 0


def _print_files(files: CertificateFiles, json_output: bool) -> None:
    if json_output:
        print_json({"identity": files.identity.spiffe_id, "cert": str(files.cert.resolve()),
                    "key": str(files.key.resolve()), "ca_cert": str(files.ca_cert.resolve())})
    else:
        print(f"issued {files.identity.spiffe_id}\n  cert {files.cert}\n  key  {files.key} (0600)")


async def _pki_bundle(settings: Settings, args: argparse.Namespace) -> int:
    spec = spec_from_args(args.host, args.roles, args.dns, args.ip)
    return _make_bundle(settings, spec, Path(args.out), args.json)


def _make_bundle(settings: Settings, spec: BundleSpec, out: Path, json_output: bool) -> int:
    if out.exists():
        raise CommandError(f"{out} already exists; choose a new file")
    # Before anything is issued: a missing directory used to fail the write after the
    # host's certificates were issued. New directories are private (the archive holds
    # keys); an existing one is left as it is.
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = _ca(settings)
    with tempfile.TemporaryDirectory(prefix="federation-bundle-") as staging:
        bundle = build_bundle(ca, settings, spec, Path(staging))
        write_bundle(bundle, ca.trust_domain, out)
    remember_spec(ca.paths, spec)
    if json_output:
        print_json({"archive": str(out.resolve()), "host": spec.host, "roles": spec.roles,
                    "identities": bundle.identities, "files": sorted(bundle.files)})
    else:
        print(f"wrote {out} (0600) for host {spec.host}: {len(bundle.files)} files")
        for identity in bundle.identities:
            print(f"  {identity['identity']}  serial {identity['serial']}  "
                  f"until {identity['not_after']}")
    return 0


async def _pki_install(settings: Settings, args: argparse.Namespace) -> int:
    manifest = install_bundle(Path(args.archive), settings.home, settings.trust_domain)
    if args.json:
        print_json({"home": str(settings.home.resolve()), "files": sorted(manifest["files"]),
                    "identities": manifest["identities"]})
    else:
        print(f"installed {len(manifest['files'])} files of host {manifest['spec']['host']} "
              f"into {settings.home}")
    return 0


async def _pki_renew(settings: Settings, args: argparse.Namespace) -> int:
    if args.host:
        if not args.out:
            raise CommandError("--host needs --out: the new bundle for that host")
        return _make_bundle(settings, recall_spec(_ca(settings).paths, args.host),
                            Path(args.out), args.json)
    if args.intermediate:
        if not args.root_key:
            raise CommandError("--intermediate needs --root-key: the root CA's key file")
        cert = _ca(settings).renew_intermediate(args.intermediate, Path(args.root_key))
        if args.json:
            print_json({"renewed": args.intermediate,
                        "not_after": cert.not_valid_after_utc.isoformat()})
        else:
            print(f"renewed the {args.intermediate} CA until "
                  f"{cert.not_valid_after_utc:%Y-%m-%d}")
        return 0
    within_days = 1e6 if args.all else (settings.pki.renew_within_days if args.within is None
                                        else args.within)
    try:
        renewed = renew_identities(_ca(settings), dt.timedelta(days=within_days))
    except NoIssuerKey as exc:
        raise CommandError(f"{exc}; on a node host, renew its bundle on the CA host "
                           "(`federation pki renew --host NAME --out FILE`) and install it "
                           "here (`federation pki install FILE`)") from None
    if args.json:
        print_json({"renewed": [f.identity.spiffe_id for f in renewed]})
    else:
        for files in renewed:
            print(f"renewed {files.identity.spiffe_id}")
        print(f"{len(renewed)} certificate(s) renewed; running nodes serve them from their "
              "next handshake")
    return 0


async def _pki_migrate(settings: Settings, args: argparse.Namespace) -> int:
    legacy, reissued = migrate_legacy(settings.home, settings.trust_domain, settings.pki)
    if args.json:
        print_json({"legacy": str(legacy), "reissued": [i.spiffe_id for i in reissued]})
    else:
        print(f"moved the single-CA PKI to {legacy}; created a root and two intermediates; "
              f"reissued {len(reissued)} identities. Enrolled edge devices must enroll again.")
    return 0
