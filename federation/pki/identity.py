"""Who a certificate says its holder is: SPIFFE-style identities and their names.

A leaf's identity is exactly one URI SAN, ``spiffe://<trust domain>/node/<name>/<role>``
for nodes, the gateway and operators, ``spiffe://<trust domain>/edge/<name>`` for
edge devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from federation.config import ALL_ROLES

ADMIN_NAME = "operator"
"""Name of the admin identity ``federation up`` issues for the local operator."""
_NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class PKIError(Exception):
    """The PKI is missing, malformed, or asked for something it must not do."""


class NoIssuerKey(PKIError):
    """This home holds no key of the CA that would sign: a node host, whose certificates
    are issued on the CA host and arrive in a bundle."""


@dataclass(frozen=True, order=True)
class Identity:
    """Who a certificate says its holder is."""

    trust_domain: str
    name: str
    role: str

    @property
    def spiffe_id(self) -> str:
        if self.role == "edge":
            return f"spiffe://{self.trust_domain}/edge/{self.name}"
        return f"spiffe://{self.trust_domain}/node/{self.name}/{self.role}"

    @property
    def is_edge(self) -> bool:
        return self.role == "edge"

    def __str__(self) -> str:
        return self.spiffe_id


def parse_spiffe_id(uri: str, trust_domain: str) -> Identity:
    """Parse and validate a SPIFFE ID issued by this federation."""
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        raise PKIError(f"identity {uri!r} is not in trust domain {trust_domain!r}")
    parts = uri[len(prefix) :].split("/")
    if len(parts) == 3 and parts[0] == "node" and parts[2] in ALL_ROLES and parts[2] != "edge":
        return Identity(trust_domain, parts[1], parts[2])
    if len(parts) == 2 and parts[0] == "edge":
        return Identity(trust_domain, parts[1], "edge")
    raise PKIError(f"identity {uri!r} does not name a known role")


def validate_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise PKIError(
            f"invalid name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return name


def validate_role(role: str) -> str:
    if role not in ALL_ROLES:
        raise PKIError(f"unknown role {role!r}; roles are: {', '.join(ALL_ROLES)}")
    return role
