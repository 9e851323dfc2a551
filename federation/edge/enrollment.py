"""Enrollment tokens and device certificates.

An operator creates a one-time token for a device name; the device generates
its key pair locally and sends a CSR with the token. The broker consumes the
token (single use, expiring; only its SHA-256 is stored) and signs a
short-lived certificate whose only identity is ``spiffe://<td>/edge/<name>``
for the token's name. Everything else in the CSR (subject, SANs, extensions)
is ignored, so a device cannot obtain a name or SAN it was not granted. The
broker signs with the edge intermediate (:func:`federation.pki.load_edge_issuer`),
which can sign nothing but edge identities.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.config import EdgeConfig
from federation.edge.audit import write_audit
from federation.edge.devices import checked_device_name
from federation.errors import ErrorCode, FederationError
from federation.fields import storable
from federation.pki import Identity, Issuer

if TYPE_CHECKING:
    from federation.edge.audit import Conn

TOKEN_PREFIX = "fedenroll_"
MAX_TOKEN_TTL = dt.timedelta(days=7)


@dataclass(frozen=True)
class IssuedCertificate:
    device_id: str
    certificate_der: bytes
    ca_certificate_der: bytes
    chain_der: tuple[bytes, ...]
    """The intermediate between the certificate and the root (the edge CA)."""
    not_after: dt.datetime


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create_token(
    pool: asyncpg.Pool, name: str, ttl: dt.timedelta, *, actor: str
) -> str:
    """A new one-time token for device ``name``; printed once, stored hashed, and its
    issue audited (by ``actor``) in the same transaction."""
    checked_device_name(name)
    if not dt.timedelta(0) < ttl <= MAX_TOKEN_TTL:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "token TTL must be positive and at most 7 days", param="ttl"
        )
    state = await pool.fetchval("SELECT state FROM edge_devices WHERE device_id = $1", name)
    if state == "revoked":
        raise FederationError(
            ErrorCode.FAILED_PRECONDITION,
            f"device {name} is revoked; enroll the device under a new name",
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO edge_enrollment_tokens (token_hash, device_name, expires_at) "
            "VALUES ($1, $2, now() + make_interval(secs => $3))",
            hash_token(token),
            name,
            ttl.total_seconds(),
        )
        await write_audit(conn, tenant_id="", actor=actor, action="edge.token.issue",
                          subject=name, attributes={"ttl_seconds": f"{ttl.total_seconds():g}"})
    return token


class Enrollment:
    def __init__(self, pool: asyncpg.Pool, config: EdgeConfig, issuer: Issuer,
                 root: x509.Certificate) -> None:
        self._pool = pool
        self._config = config
        self._issuer = issuer
        self._root = root

    async def enroll(self, token: str, csr_der: bytes, display_name: str) -> IssuedCertificate:
        storable(display_name, "device_name")
        public_key = _public_key_from_csr(csr_der)
        async with self._pool.acquire() as conn, conn.transaction():
            name = await conn.fetchval(
                """
                UPDATE edge_enrollment_tokens SET used_at = now()
                WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()
                RETURNING device_name
                """,
                hash_token(token),
            )
            if name is None:
                raise await self._refused(conn, token)
            enrolled = await conn.fetchval(
                """
                INSERT INTO edge_devices AS d (device_id, display_name) VALUES ($1, $2)
                ON CONFLICT (device_id) DO UPDATE SET display_name = $2
                WHERE d.state <> 'revoked'
                RETURNING device_id
                """,
                name,
                display_name[:200],
            )
            if enrolled is None:
                raise FederationError(ErrorCode.PERMISSION_DENIED, f"device {name} is revoked")
            # Signed inside the transaction: if signing fails the token is not spent.
            issued = self._issue(name, public_key)
            await self._audit(conn, issued, "edge.device.enroll")
            return issued

    async def _audit(self, conn: Conn, issued: IssuedCertificate, action: str) -> None:
        """A certificate handed out is on the record before the caller gets it."""
        identity = Identity(self._issuer.trust_domain, issued.device_id, "edge")
        await write_audit(conn, tenant_id="", actor=identity.spiffe_id, action=action,
                          subject=issued.device_id,
                          attributes={"not_after": issued.not_after.isoformat()})

    async def renew(self, device_id: str, csr_der: bytes) -> IssuedCertificate:
        """A fresh certificate for an authenticated, non-revoked device."""
        issued = self._issue(device_id, _public_key_from_csr(csr_der))
        async with self._pool.acquire() as conn:
            await self._audit(conn, issued, "edge.device.renew")
        return issued

    def _issue(self, name: str, public_key: ec.EllipticCurvePublicKey) -> IssuedCertificate:
        identity = Identity(self._issuer.trust_domain, name, "edge")
        validity = dt.timedelta(seconds=self._config.certificate_ttl_seconds)
        cert = self._issuer.sign(identity, public_key, (), (), validity)
        der = serialization.Encoding.DER
        return IssuedCertificate(
            device_id=name,
            certificate_der=cert.public_bytes(der),
            ca_certificate_der=self._root.public_bytes(der),
            chain_der=(self._issuer.certificate.public_bytes(der),),
            not_after=cert.not_valid_after_utc,
        )

    async def _refused(self, conn: Conn, token: str) -> FederationError:
        row = await conn.fetchrow(
            "SELECT used_at, expires_at <= now() AS expired FROM edge_enrollment_tokens "
            "WHERE token_hash = $1",
            hash_token(token),
        )
        if row is None:
            reason = "is not valid"
        elif row["used_at"] is not None:
            reason = "was already used"
        else:
            reason = "has expired"
        return FederationError(
            ErrorCode.UNAUTHENTICATED, f"enrollment token {reason}; ask for a new one"
        )


def _public_key_from_csr(csr_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "csr_der is not a DER PKCS#10 request", param="csr_der"
        ) from None
    if not csr.is_signature_valid:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "the CSR's signature does not verify", param="csr_der"
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "the CSR must carry an ECDSA P-256 or stronger key",
            param="csr_der",
        )
    return key
