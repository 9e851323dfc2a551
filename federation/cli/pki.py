"""``federation pki …``: the federation's certificate authority.

    federation pki init [--force]
    federation pki issue --role ROLE --name NAME [--dns D] [--ip A]
"""

from __future__ import annotations

import argparse
from typing import Any

from federation.cli.support import print_json
from federation.config import ALL_ROLES, Settings
from federation.pki import CertificateAuthority, load_ca


def register(commands: Any) -> None:
    pki = commands.add_parser("pki", help="the federation's certificate authority")
    sub = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create the federation CA under the home")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument("--json", action="store_true")
    init.set_defaults(handler=_pki_init)
    issue = sub.add_parser("issue", help="issue a certificate for a node, operator or device")
    issue.add_argument("--role", required=True, choices=ALL_ROLES)
    issue.add_argument("--name", required=True)
    issue.add_argument("--dns", action="append", default=[], help="extra DNS name (repeatable)")
    issue.add_argument("--ip", action="append", default=[], help="extra IP address (repeatable)")
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(handler=_pki_issue)


async def _pki_init(settings: Settings, args: argparse.Namespace) -> int:
    ca = CertificateAuthority.init(settings.home, settings.trust_domain, force=args.force)
    if args.json:
        print_json({"ca_cert": str(ca.paths.ca_cert.resolve()), "trust_domain": ca.trust_domain})
    else:
        print(f"created federation CA {ca.paths.ca_cert} (trust domain {ca.trust_domain})")
    return 0


async def _pki_issue(settings: Settings, args: argparse.Namespace) -> int:
    ca = load_ca(settings.home, settings.trust_domain)
    files = ca.issue(
        args.role,
        args.name,
        dns_names=("localhost", *args.dns),
        ip_addresses=("127.0.0.1", "::1", *args.ip),
    )
    if args.json:
        print_json(
            {
                "identity": files.identity.spiffe_id,
                "cert": str(files.cert.resolve()),
                "key": str(files.key.resolve()),
                "ca_cert": str(files.ca_cert.resolve()),
            }
        )
    else:
        print(f"issued {files.identity.spiffe_id}\n  cert {files.cert}\n  key  {files.key} (0600)")
    return 0
