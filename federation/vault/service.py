"""The tenant vault: secrets that no single party can open.

Each secret version is sealed (AES-256-GCM) under a fresh data key, split 2-of-3:

* share 1, the **client** share, is returned once at creation and never stored;
* share 2, the **gateway** share, is stored in ``vault_secrets`` wrapped under the
  gateway wrapping key (a 0600 file, never in the database);
* share 3, the **guardian** share, is deposited with the guardian over mTLS.

Reading takes the client share (client + gateway; the guardian may be down).
Recovery without the client share takes gateway + guardian, is audited by the
guardian and rate-limited there, and re-seals the secret under a new key with
new shares: the old client share stops working. Creation fails closed when the
guardian is unreachable (there would be no recovery path). Every state change,
and by default every read, is written to thermal memory, and fails if it cannot
be. All SQL runs under ``SET LOCAL ROLE federation_gateway``, which cannot read
the guardian's schema.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import asyncpg

from federation.clock import Clock, utc_now
from federation.config import DatabaseConfig, VaultConfig
from federation.crypto.envelope import (
    CiphertextInvalid,
    SealedObject,
    UnwrapError,
    new_data_key,
    open_sealed,
    open_with_shares,
    recover_key,
    seal,
    unwrap,
    wrap,
    wrap_context,
)
from federation.crypto.shares import InvalidShare, MalformedShare, Share, new_key_id, split_key
from federation.db import BoundedPool, create_pool, transaction_as
from federation.errors import ErrorCode, FederationError
from federation.guardian.client import GuardianClient
from federation.memory import AuditEntry, AuditSink
from federation.paging import page_size as checked_page_size
from federation.tenancy import checked_tenant_id
from federation.vault.records import (
    MAX_NAME,
    IssuedShare,
    PendingObject,
    SecretInfo,
    SecretPage,
    parse_page_token,
    sealed_object,
    secret_info,
    token_after,
)

log = logging.getLogger(__name__)

ROLE: Final = "federation_gateway"
CLIENT_INDEX: Final = 1
GATEWAY_INDEX: Final = 2
GUARDIAN_INDEX: Final = 3
SHARE_HEADER: Final = "X-Federation-Share"
_ID_BYTES: Final = 12
_OBJECT_ID: Final = re.compile(rf"[a-z]{{1,16}}_[0-9a-f]{{{2 * _ID_BYTES}}}")
"""The ids the vault issues (:func:`_new_object_id`): a prefix (``vs_`` secrets, ``vt_``
transcripts, …) and random hexadecimal digits."""


def _new_object_id(prefix: str) -> str:
    return prefix + secrets.token_hex(_ID_BYTES)


def _gateway_context(tenant_id: str, secret_id: str, version: int, key_id: str) -> bytes:
    return wrap_context("vault-gateway-share", tenant_id, secret_id, version, key_id)


def parse_client_share(text: str) -> Share:
    try:
        share = Share.decode(text)
    except MalformedShare as exc:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, str(exc), param=SHARE_HEADER) from None
    if share.index != CLIENT_INDEX:
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT, "invalid share: this is not a client share",
            param=SHARE_HEADER,
        )
    return share


def _text(value: str, name: str, limit: int = MAX_NAME) -> str:
    value = value.strip()
    if not value:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{name} is required", param=name)
    if len(value) > limit or not value.isprintable():
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"{name} must be printable text of at most {limit} characters", param=name,
        )
    return value


class VaultService:
    """The vault's domain core; transports (HTTP routes, CLI) only convert and delegate."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        wrapping_key: bytes,
        guardian: GuardianClient,
        audit: AuditSink,
        config: VaultConfig,
        *,
        clock: Clock = utc_now,
        pool_is_gateway_role: bool = False,
    ) -> None:
        """``pool_is_gateway_role``: every connection of ``pool`` already runs as
        ``federation_gateway`` (see :func:`create_gateway_pool`), so single reads skip the
        per-transaction ``SET LOCAL ROLE`` (3 round trips fewer on the hot path)."""
        self._pool = pool
        self._role_bound = pool_is_gateway_role
        self._wrapping_key = wrapping_key
        self._guardian = guardian
        self._audit = audit
        self._config = config
        self._clock = clock

    # ---- create ----------------------------------------------------------------------------

    async def create(self, *, tenant_id: str, name: str, value: bytes, actor: str) -> IssuedShare:
        tenant_id = checked_tenant_id(tenant_id)
        name = _text(name, "name")
        if len(value) > self._config.max_value_bytes:
            raise FederationError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"a secret value is at most {self._config.max_value_bytes} bytes", param="value",
            )
        secret_id = _new_object_id("vs_")
        key, key_id = new_data_key(), new_key_id()
        sealed = seal(key, value, tenant_id=tenant_id, object_id=secret_id, version=1,
                      key_id=key_id)
        client, gateway = await self._deposit_guardian_share(key, key_id, tenant_id, secret_id)
        try:
            async with self._after_deposit(tenant_id, secret_id, key_id, "creation failed",
                                           ROLE) as conn:
                row = await _insert(conn, sealed, name,
                                    self._wrap_gateway(gateway, tenant_id, secret_id, 1), actor,
                                    self._clock())
                await self._record("vault.secret.create", actor, tenant_id, secret_id,
                                   {"name": name, "version": "1", "key_id": key_id})
        except asyncpg.UniqueViolationError:
            raise FederationError(
                ErrorCode.ALREADY_EXISTS, f"tenant already has a secret named {name!r}",
                param="name",
            ) from None
        return IssuedShare(secret_info(row), client.encode())

    # ---- escrowed objects (no client share: tenant transcripts) ----------------------------

    async def reserve_escrowed(self, *, tenant_id: str, prefix: str = "vt_") -> PendingObject:
        """First half of storing an object that gets no client share: a fresh data key,
        split 2-of-3, the guardian's share deposited now (so a guardian outage fails the
        caller *before* it does the work), the client share dropped at once. Finish
        with :meth:`commit_escrowed` or :meth:`abandon_escrowed`."""
        tenant_id = checked_tenant_id(tenant_id)
        object_id = _new_object_id(prefix)
        key, key_id = new_data_key(), new_key_id()
        _, gateway = await self._deposit_guardian_share(key, key_id, tenant_id, object_id)
        return PendingObject(tenant_id, object_id, key_id, key, gateway)  # no client share

    async def commit_escrowed(
        self, pending: PendingObject, *, name: str, value: bytes, actor: str, action: str,
        attributes: Mapping[str, str],
    ) -> SecretInfo:
        """Seal ``value`` under the reserved key and store it; audited in the same
        transaction (``action`` on the object, ``attributes`` must hold no secret).
        Opening it later takes gateway + guardian: the admin recovery path."""
        name = _text(name, "name")
        sealed = seal(pending.key, value, tenant_id=pending.tenant_id,
                      object_id=pending.object_id, version=1, key_id=pending.key_id)
        wrapped = self._wrap_gateway(pending.gateway_share, pending.tenant_id,
                                     pending.object_id, 1)
        async with transaction_as(self._pool, None if self._role_bound else ROLE) as conn:
            row = await _insert(conn, sealed, name, wrapped, actor, self._clock())
            await self._record(action, actor, pending.tenant_id, pending.object_id,
                               {**attributes, "key_id": pending.key_id})
        return secret_info(row)

    async def abandon_escrowed(self, pending: PendingObject, reason: str) -> None:
        """Best effort: the guardian's share of a reservation that was never committed
        (useless alone: the gateway share was never stored)."""
        await self._discard_guardian_share(pending.tenant_id, pending.object_id,
                                           pending.key_id, reason)

    # ---- read ------------------------------------------------------------------------------

    async def read(
        self, *, tenant_id: str | None, secret_id: str, client_share: str, actor: str
    ) -> tuple[SecretInfo, bytes]:
        """Open with the client share and the gateway share; the guardian is not involved."""
        share = parse_client_share(client_share)
        row = await self._active_row(tenant_id, secret_id)
        value = self._open_with_client_share(row, share)
        if self._config.audit_reads:
            await self._record("vault.secret.read", actor, row["tenant_id"], secret_id,
                               {"version": str(row["version"])})
        return secret_info(row), value

    # ---- recover and rotate ----------------------------------------------------------------

    async def recover(
        self, *, tenant_id: str | None, secret_id: str, requested_by_key_id: str, reason: str
    ) -> IssuedShare:
        """Gateway + guardian shares open the secret; it is re-sealed with new shares and the
        new client share returned. Rate limit and audit of the release are the guardian's."""
        reason = _text(reason, "reason", 1000)
        requested_by_key_id = _text(requested_by_key_id, "requested_by_key_id")
        row = await self._active_row(tenant_id, secret_id)
        gateway = self._gateway_share(row)
        guardian = await self._guardian.release(
            tenant_id=row["tenant_id"], object_id=secret_id, key_id=row["key_id"],
            requested_by_key_id=requested_by_key_id, reason=reason,
        )
        sealed = sealed_object(row)
        try:
            value = open_sealed(recover_key(gateway, guardian, sealed), sealed)
        except (InvalidShare, CiphertextInvalid) as exc:
            log.error("gateway and guardian shares do not open a secret",
                      extra={"secret_id": secret_id, "error": type(exc).__name__})
            raise FederationError(
                ErrorCode.DATA_LOSS, "the gateway and guardian shares do not open this secret"
            ) from None
        return await self._reseal(row, value, "vault.secret.recover", requested_by_key_id,
                                  {"reason": reason}, recovered=True)

    async def rotate(
        self, *, tenant_id: str | None, secret_id: str, client_share: str, actor: str
    ) -> IssuedShare:
        """New data key, re-encrypted, new shares; needs the current client share."""
        share = parse_client_share(client_share)
        row = await self._active_row(tenant_id, secret_id)
        value = self._open_with_client_share(row, share)
        return await self._reseal(row, value, "vault.secret.rotate", actor, {})

    def _open_with_client_share(self, row: asyncpg.Record, share: Share) -> bytes:
        """Client share + gateway share; a bad share is the caller's fault, a ciphertext
        that does not authenticate is ours."""
        try:
            return open_with_shares(share, self._gateway_share(row), sealed_object(row))
        except InvalidShare as exc:
            raise FederationError(ErrorCode.PERMISSION_DENIED, str(exc),
                                  param=SHARE_HEADER) from None
        except CiphertextInvalid:
            log.error("vault ciphertext does not authenticate", extra={"secret_id": row["id"]})
            raise FederationError(
                ErrorCode.DATA_LOSS, "the stored secret is corrupted (it does not authenticate)"
            ) from None

    async def _reseal(
        self, row: asyncpg.Record, value: bytes, action: str, actor: str,
        attributes: Mapping[str, str], *, recovered: bool = False,
    ) -> IssuedShare:
        tenant_id, secret_id = row["tenant_id"], row["id"]
        old_key_id, version = row["key_id"], row["version"] + 1
        key, key_id = new_data_key(), new_key_id()
        sealed = seal(key, value, tenant_id=tenant_id, object_id=secret_id, version=version,
                      key_id=key_id)
        client, gateway = await self._deposit_guardian_share(key, key_id, tenant_id, secret_id)
        async with self._after_deposit(tenant_id, secret_id, key_id, f"{action} failed",
                                       ROLE) as conn:
            updated = await conn.fetchrow(
                "UPDATE vault_secrets SET version = $3, key_id = $4, nonce = $5,"
                " ciphertext = $6, kcv = $7, wrapped_share = $8, updated_at = $9,"
                " recoveries = recoveries + $10"
                " WHERE id = $1 AND version = $2 AND state = 'active' RETURNING *",
                secret_id, row["version"], version, key_id, sealed.nonce, sealed.ciphertext,
                sealed.kcv, self._wrap_gateway(gateway, tenant_id, secret_id, version),
                self._clock(), 1 if recovered else 0,
            )
            if updated is None:
                raise FederationError(
                    ErrorCode.ABORTED, "the secret changed meanwhile; try again"
                )
            await self._record(action, actor, tenant_id, secret_id,
                               {**attributes, "version": str(version), "key_id": key_id})
        # The superseded guardian share is useless without the old gateway share, which is
        # gone; destroy it anyway, best-effort (the old client share + it could open backups).
        await self._discard_guardian_share(
            tenant_id, secret_id, old_key_id, f"superseded by version {version}"
        )
        return IssuedShare(secret_info(updated), client.encode())

    # ---- list and destroy ------------------------------------------------------------------

    async def list(self, tenant_id: str, page_size: int = 0, page_token: str = "") -> SecretPage:
        size = checked_page_size(page_size)
        after_time, after_id = parse_page_token(page_token)
        async with transaction_as(self._pool, ROLE) as conn:
            rows = await conn.fetch(
                "SELECT id, tenant_id, name, version, state, created_by, created_at, updated_at,"
                " destroyed_at, recoveries FROM vault_secrets WHERE tenant_id = $1"
                " AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4",
                tenant_id, after_time, after_id, size + 1,
            )
        page = [secret_info(r) for r in rows[:size]]
        token = token_after(page[-1]) if len(rows) > size else ""
        return SecretPage(page, token)

    async def get_info(self, tenant_id: str | None, secret_id: str) -> SecretInfo:
        return secret_info(await self._row(tenant_id, secret_id))

    async def destroy(
        self, *, tenant_id: str | None, secret_id: str, reason: str, actor: str
    ) -> SecretInfo:
        """Crypto-shredding: the guardian's and the gateway's shares (and the ciphertext) are
        erased; the client share alone opens nothing. Idempotent."""
        reason = _text(reason, "reason", 1000)
        row = await self._row(tenant_id, secret_id)
        if row["state"] == "destroyed":
            return secret_info(row)
        try:
            await self._guardian.destroy(
                tenant_id=row["tenant_id"], object_id=secret_id, key_id=row["key_id"],
                reason=reason,
            )
        except FederationError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                raise
        async with transaction_as(self._pool, ROLE) as conn:
            updated = await conn.fetchrow(
                "UPDATE vault_secrets SET state = 'destroyed', wrapped_share = NULL,"
                " ciphertext = NULL, nonce = NULL, kcv = NULL, destroyed_at = $2, updated_at = $2"
                " WHERE id = $1 AND state = 'active' RETURNING *",
                secret_id, self._clock(),
            )
            if updated is None:
                return secret_info(await self._row(tenant_id, secret_id))
            await self._record("vault.secret.destroy", actor, row["tenant_id"], secret_id,
                               {"reason": reason, "version": str(row["version"])})
        return secret_info(updated)

    # ---- helpers ---------------------------------------------------------------------------

    async def _row(self, tenant_id: str | None, secret_id: str) -> asyncpg.Record:
        if _OBJECT_ID.fullmatch(secret_id) is None:  # never issued, and a NUL would not even
            # reach the query: PostgreSQL refuses it as text
            raise FederationError(ErrorCode.NOT_FOUND,
                                  f"no secret {secret_id[:64]!r} for this tenant")
        query = (
            "SELECT * FROM vault_secrets WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)"
        )
        if self._role_bound:
            row = await self._pool.fetchrow(query, secret_id, tenant_id)
        else:
            async with transaction_as(self._pool, ROLE) as conn:
                row = await conn.fetchrow(query, secret_id, tenant_id)
        if row is None:
            raise FederationError(ErrorCode.NOT_FOUND, f"no secret {secret_id!r} for this tenant")
        return row

    async def _active_row(self, tenant_id: str | None, secret_id: str) -> asyncpg.Record:
        row = await self._row(tenant_id, secret_id)
        if row["state"] != "active":
            raise FederationError(
                ErrorCode.FAILED_PRECONDITION,
                f"secret {secret_id!r} was destroyed; nothing can open it",
            )
        return row

    def _wrap_gateway(self, share: Share, tenant_id: str, secret_id: str, version: int) -> bytes:
        return wrap(self._wrapping_key, share.encode().encode(),
                    _gateway_context(tenant_id, secret_id, version, share.key_id))

    def _gateway_share(self, row: asyncpg.Record) -> Share:
        try:
            text = unwrap(
                self._wrapping_key, bytes(row["wrapped_share"]),
                _gateway_context(row["tenant_id"], row["id"], row["version"], row["key_id"]),
            )
            return Share.decode(text.decode())
        except (UnwrapError, MalformedShare, UnicodeDecodeError):
            log.error("gateway share does not unwrap", extra={"secret_id": row["id"]})
            raise FederationError(
                ErrorCode.DATA_LOSS,
                "the gateway's share of this secret does not open under its wrapping key",
            ) from None

    async def _record(
        self, action: str, actor: str, tenant_id: str, secret_id: str,
        attributes: Mapping[str, str],
    ) -> None:
        await self._audit.record(AuditEntry(
            actor=actor, action=action, tenant_id=tenant_id, subject=secret_id,
            attributes=dict(attributes),
        ))

    async def _deposit_guardian_share(
        self, key: bytes, key_id: str, tenant_id: str, object_id: str
    ) -> tuple[Share, Share]:
        """Split ``key`` 2-of-3 and deposit the guardian's share first: without it there is
        no recovery path, so everything after fails closed. The client and gateway shares."""
        client, gateway, guardian = split_key(key, key_id)
        await self._guardian.deposit(
            tenant_id=tenant_id, object_id=object_id, key_id=key_id, share=guardian
        )
        return client, gateway

    @contextlib.asynccontextmanager
    async def _after_deposit(
        self, tenant_id: str, object_id: str, key_id: str, reason: str, role: str | None
    ) -> AsyncIterator[Any]:
        """The transaction that stores what a guardian share was just deposited for; if it
        fails, that share is destroyed (``reason``), best-effort, and the failure raised."""
        try:
            async with transaction_as(self._pool, role) as conn:
                yield conn
        except BaseException:
            await self._discard_guardian_share(tenant_id, object_id, key_id, reason)
            raise

    async def _discard_guardian_share(
        self, tenant_id: str, secret_id: str, key_id: str, reason: str
    ) -> None:
        try:
            await self._guardian.destroy(
                tenant_id=tenant_id, object_id=secret_id, key_id=key_id, reason=reason
            )
        except Exception as exc:
            log.warning("could not destroy a guardian share",
                        extra={"secret_id": secret_id, "error": str(exc)[:200]})


async def _insert(conn: Any, sealed: SealedObject, name: str, wrapped_share: bytes, actor: str,
                  now: dt.datetime) -> asyncpg.Record:
    """A new secret (version 1) from its sealed object and wrapped gateway share."""
    row = await conn.fetchrow(
        "INSERT INTO vault_secrets (id, tenant_id, name, state, version, key_id, nonce,"
        " ciphertext, kcv, wrapped_share, created_by, created_at, updated_at)"
        " VALUES ($1, $2, $3, 'active', 1, $4, $5, $6, $7, $8, $9, $10, $10)"
        " RETURNING *",
        sealed.object_id, sealed.tenant_id, name, sealed.key_id, sealed.nonce,
        sealed.ciphertext, sealed.kcv, wrapped_share, actor, now,
    )
    assert isinstance(row, asyncpg.Record)
    return row


async def _as_gateway_role(conn: asyncpg.Connection[Any]) -> None:
    # ``role`` is not reset by RESET ALL (asyncpg's reset on release), so it sticks.
    await conn.execute(f"SET ROLE {ROLE}")


async def create_gateway_pool(url: str, config: DatabaseConfig) -> BoundedPool:
    """A pool whose every connection runs as ``federation_gateway`` (migrations must have
    run: the role is created by migration 0020)."""
    return await create_pool(url, config, init=_as_gateway_role)
