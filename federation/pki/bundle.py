"""One archive per host holding exactly what that host needs, and nothing else.

``federation pki bundle --host NAME --roles R1,R2`` runs on the CA host and writes a
gzipped tar (created 0600) whose paths are relative to the host's federation home:

* every host: the root and both intermediates' certificates, ``bundle.json``;
* per role: ``pki/issued/<role>-<host>.pem|.key``, the host's identity for that role
  (``admin`` is the operator's identity, named ``operator``);
* ``broker``: the edge intermediate's key, to enroll devices (it can sign nothing else);
* ``guardian``: the checkpoint signing key (and its public half);
* ``memory``: the guardian's public checkpoint key, to check signatures in ``VerifyChain``;
* ``postgres`` (the database host): a server certificate for PostgreSQL's TLS,
  ``postgres/server.crt|.key``; its URI names no role, so it opens no gRPC door.

No host gets the root key or the nodes intermediate's key. ``federation pki install``
unpacks a bundle into a home: files are checked against the manifest, written beside
the live ones and renamed into place (keys before certificates), so running nodes
pick the new certificates up at their next handshake. The parameters of each bundle
are kept on the CA host (``pki/hosts/<host>.json``) so that ``federation pki renew
--host NAME`` can issue the same bundle again with fresh certificates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from federation.config import ALL_ROLES, Settings
from federation.durable import write_all
from federation.guardian.checkpoints import PUBLIC_KEY_SUFFIX, load_signing_key
from federation.pki.authority import CertificateAuthority, log_issuance
from federation.pki.files import (
    EDGE,
    NODES,
    PKIPaths,
    cert_pem,
    key_pem,
    leaf_certificate,
    write_file,
    write_files,
)
from federation.pki.identity import ADMIN_NAME, Identity, PKIError, validate_name

POSTGRES = "postgres"
"""A host role that is not a federation identity: PostgreSQL's server certificate."""
HOST_ROLES: tuple[str, ...] = (*(r for r in ALL_ROLES if r != "edge"), POSTGRES)
MANIFEST = "bundle.json"
FORMAT = "federation-host-bundle/1"
_PRIVATE_MODE, _PUBLIC_MODE = 0o600, 0o644


@dataclass(frozen=True)
class BundleSpec:
    """What a host runs and how it is reached: the input of a bundle."""

    host: str
    roles: tuple[str, ...]
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_name(self.host)
        if not self.roles:
            raise PKIError("a bundle needs at least one role (--roles)")
        unknown = [r for r in self.roles if r not in HOST_ROLES]
        if unknown:
            raise PKIError(f"unknown host role(s) {', '.join(unknown)}; host roles are: "
                           + ", ".join(HOST_ROLES))

    def identity_name(self, role: str) -> str:
        return ADMIN_NAME if role == "admin" else self.host

    @property
    def server_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """DNS and IP SANs: the host's name first, then what the operator listed."""
        return tuple(dict.fromkeys((self.host, *self.dns_names))), self.ip_addresses


@dataclass
class Bundle:
    """The files of one host's bundle, relative to its home: content and mode."""

    spec: BundleSpec
    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    identities: list[dict[str, str]] = field(default_factory=list)

    def add(self, relative: str, data: bytes, mode: int) -> None:
        self.files[relative] = (data, mode)

    def manifest(self, trust_domain: str) -> bytes:
        return json.dumps({
            "format": FORMAT,
            "trust_domain": trust_domain,
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "spec": asdict(self.spec),
            "identities": self.identities,
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "mode": mode}
                      for name, (data, mode) in sorted(self.files.items())},
        }, indent=2, sort_keys=True).encode()


def build_bundle(ca: CertificateAuthority, settings: Settings, spec: BundleSpec,
                 staging: Path) -> Bundle:
    """Issue the host's identities into ``staging`` (a private scratch directory on the CA
    host) and collect every file the host needs."""
    home, paths = settings.home, ca.paths
    bundle = Bundle(spec)
    for relative in (paths.ca_cert, paths.intermediate_cert(NODES), paths.intermediate_cert(EDGE)):
        bundle.add(_relative(relative, home), relative.read_bytes(), _PUBLIC_MODE)
    into = PKIPaths(staging)
    dns, ips = spec.server_names
    for role in spec.roles:
        if role == POSTGRES:
            _add_postgres(bundle, ca, spec)
            continue
        name = spec.identity_name(role)
        files = ca.issue(role, name, dns_names=dns, ip_addresses=ips, into=into)
        cert = leaf_certificate(files.cert)
        bundle.identities.append({"identity": files.identity.spiffe_id,
                                  "serial": format(cert.serial_number, "x"),
                                  "not_after": cert.not_valid_after_utc.isoformat()})
        bundle.add(_relative(paths.leaf_cert(role, name), home), files.cert.read_bytes(),
                   _PUBLIC_MODE)
        bundle.add(_relative(paths.leaf_key(role, name), home), files.key.read_bytes(),
                   _PRIVATE_MODE)
    _add_role_keys(bundle, ca, settings)
    return bundle


def _add_postgres(bundle: Bundle, ca: CertificateAuthority, spec: BundleSpec) -> None:
    issuer = ca.issuer(NODES)
    key = ec.generate_private_key(ec.SECP256R1())
    identity = Identity(ca.trust_domain, spec.host, POSTGRES)
    dns, ips = spec.server_names
    cert = issuer.sign(identity, key.public_key(), dns, ips,
                       dt.timedelta(days=ca.config.leaf_validity_days))
    log_issuance(ca.paths, identity, NODES, cert)
    bundle.identities.append({"identity": identity.spiffe_id,
                              "serial": format(cert.serial_number, "x"),
                              "not_after": cert.not_valid_after_utc.isoformat()})
    bundle.add("postgres/server.crt", cert_pem(cert, issuer.certificate), _PUBLIC_MODE)
    bundle.add("postgres/server.key", key_pem(key), _PRIVATE_MODE)


def _add_role_keys(bundle: Bundle, ca: CertificateAuthority, settings: Settings) -> None:
    roles, home = bundle.spec.roles, settings.home
    if "broker" in roles:
        key = ca.paths.intermediate_key(EDGE)
        if not key.exists():
            raise PKIError(f"{key} is missing: the broker's bundle needs the edge CA key")
        bundle.add(_relative(key, home), key.read_bytes(), _PRIVATE_MODE)
    signing = home / settings.guardian.signing_key_file
    public = signing.with_name(signing.name + PUBLIC_KEY_SUFFIX)
    if "guardian" in roles or "memory" in roles:
        load_signing_key(signing)  # created here, on the CA host, once for the federation
    if "guardian" in roles:
        bundle.add(settings.guardian.signing_key_file, signing.read_bytes(), _PRIVATE_MODE)
    if "guardian" in roles or "memory" in roles:
        bundle.add(_relative(public, home), public.read_bytes(), _PUBLIC_MODE)


def _relative(path: Path, home: Path) -> str:
    return path.relative_to(home).as_posix()


def write_bundle(bundle: Bundle, trust_domain: str, out: Path) -> None:
    """The archive, created 0600 (it holds private keys) and never over another file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        entries = {MANIFEST: (bundle.manifest(trust_domain), _PUBLIC_MODE), **bundle.files}
        for name, (data, mode) in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_MODE)
    try:
        write_all(fd, buffer.getvalue(), out)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        out.unlink(missing_ok=True)  # ours (O_EXCL): no truncated archive left behind
        raise
    os.close(fd)


def remember_spec(paths: PKIPaths, spec: BundleSpec) -> None:
    """Kept on the CA host so that a renewal issues the same bundle again."""
    write_file(paths.directory / "hosts" / f"{spec.host}.json",
               json.dumps(asdict(spec), indent=2).encode())


def recall_spec(paths: PKIPaths, host: str) -> BundleSpec:
    path = paths.directory / "hosts" / f"{validate_name(host)}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PKIError(f"no bundle was made for host {host} here ({path} is missing); "
                       "make one with `federation pki bundle`") from None
    return BundleSpec(data["host"], tuple(data["roles"]), tuple(data["dns_names"]),
                      tuple(data["ip_addresses"]))


def read_bundle(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the files of a bundle, each file checked against the manifest."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            contents = {m.name: _member(tar, m) for m in tar.getmembers()}
    except (OSError, tarfile.TarError) as exc:
        raise PKIError(f"{archive} is not a host bundle: {exc}") from None
    try:
        manifest = json.loads(contents.pop(MANIFEST))
    except (KeyError, ValueError):
        raise PKIError(f"{archive} has no valid {MANIFEST}") from None
    if manifest.get("format") != FORMAT:
        raise PKIError(f"{archive} is not a {FORMAT} bundle")
    listed = manifest["files"]
    if set(listed) != set(contents):
        raise PKIError(f"{archive}: its files do not match its manifest")
    for name, data in contents.items():
        _check_relative(name)
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise PKIError(f"{archive}: {name} does not match its manifest (damaged?)")
    return manifest, contents


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if not member.isfile():
        raise PKIError(f"unexpected entry {member.name!r} in a host bundle")
    extracted = tar.extractfile(member)
    assert extracted is not None
    return extracted.read()


def _check_relative(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise PKIError(f"a bundle names a path outside the home: {name}")


def install_bundle(archive: Path, home: Path, trust_domain: str) -> dict[str, Any]:
    """Unpack ``archive`` into ``home``: keys first, then certificates, each renamed into
    place, so a node reloading at any moment finds a matching pair (or retries)."""
    manifest, contents = read_bundle(archive)
    if manifest.get("trust_domain") != trust_domain:
        raise PKIError(f"{archive} is for trust domain {manifest.get('trust_domain')!r}, "
                       f"this home's is {trust_domain!r}")
    modes: dict[str, dict[str, int]] = manifest["files"]
    private_first = sorted(contents, key=lambda n: (modes[n]["mode"] != _PRIVATE_MODE, n))
    # Every file staged before any is replaced: a write that fails half-way (a full disk)
    # must not leave new keys beside the old certificates.
    write_files([(home / name, contents[name], _PRIVATE_MODE
                  if modes[name]["mode"] == _PRIVATE_MODE else _PUBLIC_MODE)
                 for name in private_first]
                + [(home / "pki" / MANIFEST, json.dumps(manifest, indent=2).encode(),
                    _PUBLIC_MODE)])
    return manifest


def spec_from_args(host: str, roles: str, dns: Sequence[str], ips: Sequence[str]
                   ) -> BundleSpec:
    """``--roles a,b`` and the repeated ``--dns``/``--ip`` flags as a spec."""
    role_list = tuple(r.strip() for r in roles.split(",") if r.strip())
    return BundleSpec(host, role_list, tuple(dns), tuple(ips))
