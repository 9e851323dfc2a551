"""HTTPS for the gateway: TLS 1.3 minimum, from the federation's certificate or the
operator's own files, reloaded when they are renewed.

Python's ``ssl.SSLContext.load_cert_chain`` on the context the server already uses
replaces the certificate for every later handshake, so a renewal needs no restart:
a periodic check loads the files again when they changed on disk. Plain HTTP
(``gateway.tls = "off"``) stays the default, meant for loopback.
"""

from __future__ import annotations

import logging
import ssl

from cryptography import x509

from federation.config import ConfigError, Settings
from federation.credentials import CertificateExpiry, CertificateWatch
from federation.periodic import PeriodicTask
from federation.pki import CertificateFiles, Identity, PKIError

log = logging.getLogger(__name__)

MODES = ("off", "federation", "files")


def https_files(settings: Settings, credentials: CertificateFiles | None
                ) -> CertificateFiles | None:
    """The certificate the gateway serves over HTTPS; ``None`` for plain HTTP."""
    config = settings.gateway
    if config.tls not in MODES:
        raise ConfigError(f"gateway.tls must be one of {', '.join(MODES)}, not {config.tls!r}")
    if config.tls == "off":
        return None
    if config.tls == "federation":
        if credentials is None:
            raise ConfigError('gateway.tls = "federation" needs the gateway\'s certificate')
        return credentials
    if not config.tls_cert_file or not config.tls_key_file:
        raise ConfigError('gateway.tls = "files" needs tls_cert_file and tls_key_file')
    cert, key = (settings.home / config.tls_cert_file, settings.home / config.tls_key_file)
    identity = Identity(settings.trust_domain, settings.node_name, "gateway")
    return CertificateFiles(identity, cert, key, cert)


class HttpsContext:
    """The server's ``SSLContext`` and the task that keeps its certificate current."""

    def __init__(self, files: CertificateFiles, reload_seconds: float,
                 expiry: CertificateExpiry | None = None) -> None:
        """``expiry``: where the served certificate's expiry is exported (kind ``https``)."""
        self._files = files
        self._watch = CertificateWatch(files)
        self._expiry = expiry
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.reloads = 0
        self._load()
        self._task = PeriodicTask("https-certificate", reload_seconds, self.reload_if_changed)

    def _load(self) -> None:
        loaded = self._watch.load()  # checks that the key matches the certificate
        self.context.load_cert_chain(str(self._files.cert), str(self._files.key))
        if self._expiry is not None:
            served = x509.load_pem_x509_certificate(loaded.chain_pem)
            self._expiry.set("https", self._files.identity.spiffe_id, served)

    async def reload_if_changed(self) -> None:
        if not self._watch.changed():
            return
        try:
            self._load()
        except (OSError, ValueError, ssl.SSLError, PKIError) as exc:
            log.warning("renewed HTTPS certificate not loaded; serving the previous one",
                        extra={"error": str(exc)[:300]})
            return
        self.reloads += 1
        log.info("serving a renewed HTTPS certificate", extra={"cert": str(self._files.cert)})

    async def start(self) -> None:
        await self._task.start()

    async def stop(self) -> None:
        await self._task.stop()


def warn_if_plain_off_loopback(settings: Settings) -> None:
    host = settings.gateway.http_host
    if settings.gateway.tls == "off" and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("the gateway serves plain HTTP on a non-loopback address; set "
                    'gateway.tls = "federation" or "files"', extra={"host": host})

