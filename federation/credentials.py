"""Certificates that change under a running process: renewal without a restart.

A node's server certificate is served through grpc's dynamic server credentials:
grpc asks :meth:`ReloadingServerCredentials.fetch` before every new TLS handshake,
and it answers with the files' new contents once they changed on disk (``federation
pki renew`` or an installed bundle replaces them atomically), else "no change".
Connections already open keep their session; calls on them are not disturbed. A
replacement that is not valid at that moment (not yet, or no more) is not taken: the
certificate in use stays until the files hold one that is. The
expiry of every certificate a process holds is a Prometheus gauge,
``federation_certificate_expiry_timestamp_seconds``, so an alert can fire long before
a failed renewal matters.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Gauge

from federation.pki import CertificateFiles, PKIError

log = logging.getLogger(__name__)

_FileSignature = tuple[tuple[int, int, int], ...]


class CertificateExpiry:
    """``federation_certificate_expiry_timestamp_seconds{kind, identity}``: when each
    certificate this process presents or trusts expires (Unix time), updated when a
    renewed one is loaded. ``kind``: ``leaf`` (named by its SPIFFE id), ``intermediate``
    (``nodes-ca``, ``edge-ca``), ``ca`` (the root, named by the trust domain) or ``https``
    (the gateway's HTTPS certificate)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauge = Gauge(
            "federation_certificate_expiry_timestamp_seconds",
            "When a certificate this process uses expires (Unix time): its own (kind leaf, "
            "named by its SPIFFE id), its intermediate's, its CA's (kind ca, named by trust "
            "domain); the value follows renewals.",
            ("kind", "identity"), registry=registry)

    def record(self, files: CertificateFiles, chain_pem: bytes, ca_pem: bytes) -> None:
        chain = x509.load_pem_x509_certificates(chain_pem)
        self.set("leaf", files.identity.spiffe_id, chain[0])
        for intermediate in chain[1:]:
            self.set("intermediate", _label(intermediate), intermediate)
        self.set("ca", files.identity.trust_domain, x509.load_pem_x509_certificate(ca_pem))

    def set(self, kind: str, identity: str, certificate: x509.Certificate) -> None:
        self.gauge.labels(kind, identity).set(certificate.not_valid_after_utc.timestamp())


def _label(certificate: x509.Certificate) -> str:
    units = certificate.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else certificate.subject.rfc4514_string()


@dataclass(frozen=True)
class LoadedCertificate:
    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes


class CertificateWatch:
    """One identity's files on disk: noticed when they change, checked when read."""

    def __init__(self, files: CertificateFiles) -> None:
        self.files = files
        self._signature: _FileSignature | None = None

    def _current_signature(self) -> _FileSignature:
        def one(path: Path) -> tuple[int, int, int]:
            stat = path.stat()
            return stat.st_ino, stat.st_mtime_ns, stat.st_size
        return one(self.files.cert), one(self.files.key), one(self.files.ca_cert)

    def changed(self) -> bool:
        try:
            return self._current_signature() != self._signature
        except OSError:
            return False  # a file being replaced: keep what we have, look again next time

    def load(self, *, replacing: bool = False) -> LoadedCertificate:
        """Read the files; :class:`PKIError` if the key does not match the certificate,
        or (``replacing`` the one in use) if the new certificate is not valid now."""
        signature = self._current_signature()
        key_pem, chain_pem, ca_pem = self.files.read()
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = x509.load_pem_x509_certificate(chain_pem)
        if key.public_key() != leaf.public_key():
            raise PKIError(f"{self.files.key} does not match {self.files.cert} (a renewal "
                           "half written?)")
        if replacing:
            _check_in_force(leaf, self.files.cert)
        self._signature = signature
        return LoadedCertificate(key_pem, chain_pem, ca_pem)


def _check_in_force(leaf: x509.Certificate, path: Path) -> None:
    """A replacement is taken only while it is valid: one not valid yet (issued on a host
    whose clock is ahead) or already expired (an old archive installed) would make every
    peer refuse the handshake, while the one in use may still be good. The files are
    looked at again at the next handshake or call, so a certificate that becomes valid a
    little later is then taken."""
    now = dt.datetime.now(dt.UTC)
    if now < leaf.not_valid_before_utc:
        ahead = (leaf.not_valid_before_utc - now).total_seconds()
        when = f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}"
        raise PKIError(f"{path} is not valid before {when} UTC ({ahead:.0f}s from now: is "
                       "the issuing host's clock ahead?); keeping the current certificate "
                       "until then")
    if now >= leaf.not_valid_after_utc:
        raise PKIError(f"{path} expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
                       "(an old certificate installed?); keeping the current certificate")


class ReloadingServerCredentials:
    """grpc server credentials that follow an identity's files on disk."""

    def __init__(self, files: CertificateFiles, *, require_client_auth: bool = True,
                 expiry: CertificateExpiry | None = None) -> None:
        """``require_client_auth=False`` is only for the broker's enrollment port: grpc
        then does not ask for a client certificate at all, and the interceptor lets
        callers reach ``authz.UNAUTHENTICATED_METHODS`` only."""
        self._watch = CertificateWatch(files)
        self._expiry = expiry
        self._lock = threading.Lock()  # grpc may call fetch from several threads
        self.reloads = 0
        first = self._watch.load()
        self._record(first)
        # The stubs say the fetcher returns a configuration; grpc documents None as
        # "no change", which is what it returns on almost every handshake.
        fetch: Callable[[], grpc.ServerCertificateConfiguration] = self.fetch  # type: ignore[assignment]
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(first), fetch, require_client_authentication=require_client_auth)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each new handshake: new files, or ``None`` (no change)."""
        with self._lock:
            if not self._watch.changed():
                return None
            try:
                loaded = self._watch.load(replacing=True)
            except (OSError, ValueError, PKIError) as exc:
                log.warning("renewed certificate not loaded; serving the previous one",
                            extra={"error": str(exc)[:300]})
                return None
            self.reloads += 1
            self._record(loaded)
            log.info("serving a renewed certificate",
                     extra={"identity": self._watch.files.identity.spiffe_id})
            return _configuration(loaded)

    def _record(self, loaded: LoadedCertificate) -> None:
        if self._expiry is not None:
            self._expiry.record(self._watch.files, loaded.chain_pem, loaded.ca_pem)


def _configuration(loaded: LoadedCertificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(loaded.key_pem, loaded.chain_pem)], root_certificates=loaded.ca_pem)
