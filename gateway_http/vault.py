"""The tenant vault over HTTP: thin handlers over :class:`~federation.vault.VaultService`.

Routes (JSON; every response carrying a share or a value is ``Cache-Control: no-store``):

* ``POST   /v1/vault/secrets``               scope ``vault:write`` → 201, id + client share
* ``GET    /v1/vault/secrets``               scope ``vault:read``  → metadata list
* ``GET    /v1/vault/secrets/{id}``          scope ``vault:read``, header ``X-Federation-Share``
* ``POST   /v1/vault/secrets/{id}/rotate``   scope ``vault:write``, header ``X-Federation-Share``
* ``POST   /v1/vault/secrets/{id}/recover``  scope ``admin``, body ``{"reason": ...}``
* ``DELETE /v1/vault/secrets/{id}``          scope ``vault:write``, ``?reason=`` or JSON body

Every route acts on the caller's tenant (the API key's), except ``recover``, which
needs the ``admin`` scope and may act on any tenant's secret. Every call counts
against the key's requests-per-minute limit, as a generation does
(``gateway_http/request_rate.py``). Errors go through the gateway's
``error_middleware`` (one catalog): guardian down → 503, the key's request rate spent
or the recovery rate limit → 429 with ``Retry-After``.

Wiring (in ``gateway_http/app.py::create_app``)::

    from gateway_http.vault import add_vault_routes
    add_vault_routes(app, settings, credentials)

``add_vault_routes`` registers a ``cleanup_ctx`` entry that opens the database
pool, loads the gateway wrapping key and builds the guardian and thermal-memory
clients, and the tenant-transcript recorder on the same vault
(``gateway_http/transcripts.py``); ``vault=`` and ``keys=`` replace them in tests
(no transcripts then).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from federation.channels import open_channel
from federation.config import ConfigError, Settings
from federation.crypto.keyfile import load_or_create_key
from federation.db import DatabaseWatch
from federation.db import connect as connect_database
from federation.db.migrate import apply_migrations, check_schema
from federation.errors import ErrorCode, FederationError
from federation.guardian.client import GrpcGuardianClient
from federation.keys.client import KeyPrincipal, KeyVerifier
from federation.memory.client import GrpcAuditSink
from federation.pki import CertificateFiles
from federation.telemetry.metrics import database_up_collector
from federation.vault.service import SHARE_HEADER, VaultService, create_gateway_pool
from federation.vault.tenants import TenantSettingsReader
from gateway_http.auth import authenticate
from gateway_http.body import has_json_body, json_body
from gateway_http.database_probe import NewConnectionProbe
from gateway_http.state import DATABASE_NEW_CONNECTION, DATABASE_WATCH, PRINCIPAL, STATE
from gateway_http.transcripts import TRANSCRIPTS, TranscriptRecorder

VAULT = web.AppKey("vault_service", VaultService)
VAULT_KEYS = web.AppKey("vault_key_verifier", KeyVerifier)

WRITE_SCOPE = "vault:write"
READ_SCOPE = "vault:read"
ADMIN_SCOPE = "admin"
_NO_STORE = {"Cache-Control": "no-store"}
_QUERY_INT = re.compile(r"-?[0-9]{1,18}")


def add_vault_routes(
    app: web.Application,
    settings: Settings | None = None,
    credentials: CertificateFiles | None = None,
    *,
    vault: VaultService | None = None,
    keys: KeyVerifier | None = None,
) -> None:
    """Add the vault endpoints to ``app``.

    Production: pass ``settings`` and the gateway's ``credentials`` (``None`` only
    under ``--insecure-dev``); a ``cleanup_ctx`` entry builds the vault at startup.
    Tests: pass a ready ``vault`` (and ``keys`` to bypass the gateway's verifier).
    """
    if keys is not None:
        app[VAULT_KEYS] = keys
    if vault is not None:
        app[VAULT] = vault
    elif settings is not None:
        app.cleanup_ctx.append(_vault_context(settings, credentials))
    else:
        raise ValueError("add_vault_routes needs settings or a vault")
    app.router.add_post("/v1/vault/secrets", create_secret)
    app.router.add_get("/v1/vault/secrets", list_secrets)
    app.router.add_get("/v1/vault/secrets/{id}", read_secret)
    app.router.add_post("/v1/vault/secrets/{id}/rotate", rotate_secret)
    app.router.add_post("/v1/vault/secrets/{id}/recover", recover_secret)
    app.router.add_delete("/v1/vault/secrets/{id}", destroy_secret)


def _vault_context(
    settings: Settings, credentials: CertificateFiles | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        if not settings.database.url:
            raise ConfigError("the vault needs PostgreSQL: set FEDERATION_DATABASE_URL")
        async with contextlib.AsyncExitStack() as stack:
            # Migrations normally ran when the nodes started; applying them here too makes
            # the gateway's role exist even if the gateway starts first. A gateway logging
            # in as its own role (database.migrate = false) only checks the schema.
            conn = await connect_database(settings.database.url, settings.database)
            try:
                if settings.database.migrate:
                    await apply_migrations(conn)
                else:
                    await check_schema(conn)
            finally:
                await conn.close()
            pool = await create_gateway_pool(settings.database.url, settings.database)
            stack.push_async_callback(pool.close)
            # Fail fast (503 at once) while PostgreSQL is unreachable, not after timeouts.
            watch = app[DATABASE_WATCH] = DatabaseWatch(settings.database.url,
                                                        settings.database, pool)
            if (state := app.get(STATE)) is not None:  # the whole gateway, not a test app
                state.metrics.registry.register(database_up_collector(lambda: watch.reachable))
            await watch.start()
            stack.push_async_callback(watch.stop)
            # /health also asks whether a new connection can be made (the watch's is old).
            new_connection = app[DATABASE_NEW_CONNECTION] = NewConnectionProbe(
                settings.database.url, settings.gateway.health_timeout_seconds,
                settings.gateway.health_database_cache_seconds)
            stack.push_async_callback(new_connection.stop)
            channels = {}
            for role in ("guardian", "memory"):
                channels[role] = open_channel(settings.peers.address(role), credentials,
                                              settings.grpc)
                stack.push_async_callback(channels[role].close)
            config = settings.vault
            app[VAULT] = VaultService(
                pool,
                load_or_create_key(settings.home / config.wrapping_key_file),
                GrpcGuardianClient(channels["guardian"], config.guardian_timeout_seconds),
                GrpcAuditSink(channels["memory"],
                              timeout_seconds=settings.grpc.call_timeout_seconds),
                config,
                pool_is_gateway_role=True,
            )
            # Tenant transcripts are vault objects: same pool, wrapping key and guardian.
            app[TRANSCRIPTS] = TranscriptRecorder(app[VAULT], TenantSettingsReader(pool))
            yield

    return context


async def _principal(request: web.Request, scope: str) -> KeyPrincipal:
    """The caller's key, counted against its request rate before any work (a vault call
    costs database and guardian round trips: ``--rpm`` bounds them as it bounds
    generations). Set on the request first, so that a refusal is audited too."""
    state = request.app.get(STATE)
    keys = request.app.get(VAULT_KEYS) or request.app[STATE].keys
    principal = await authenticate(request, keys, scope)
    request[PRINCIPAL] = principal
    if state is not None and state.request_rate is not None:
        await state.request_rate.count(principal.key_id)
    return principal


def _json(request: web.Request) -> dict[str, Any]:
    """The JSON object body (parsed by ``gateway_http/body.py``); ``{}`` without one."""
    if not has_json_body(request):
        return {}
    body = json_body(request)
    if not isinstance(body, dict):
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "the body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{name} must be a string", param=name)
    return value


def _share(request: web.Request) -> str:
    values = request.headers.getall(SHARE_HEADER, [])
    if len(values) != 1 or not values[0].strip():
        raise FederationError(
            ErrorCode.INVALID_ARGUMENT,
            f"send the client share once, in the {SHARE_HEADER} header", param=SHARE_HEADER,
        )
    return str(values[0])


def _value(body: dict[str, Any]) -> bytes:
    if "value_base64" in body and "value" in body:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "give value or value_base64, not "
                              "both", param="value")
    if "value_base64" in body:
        try:
            return base64.b64decode(_string(body, "value_base64"), validate=True)
        except ValueError:  # binascii.Error, or a character outside ASCII
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "value_base64 is not base64",
                                  param="value_base64") from None
    if "value" not in body:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, "value is required", param="value")
    return _string(body, "value").encode()


async def create_secret(request: web.Request) -> web.Response:
    principal = await _principal(request, WRITE_SCOPE)
    body = _json(request)
    issued = await request.app[VAULT].create(
        tenant_id=principal.tenant_id, name=_string(body, "name"), value=_value(body),
        actor=principal.key_id,
    )
    return web.json_response(
        {**issued.info.to_json(), "client_share": issued.client_share,
         "note": "store the client share now: the federation does not keep it"},
        status=201, headers=_NO_STORE,
    )


async def list_secrets(request: web.Request) -> web.Response:
    principal = await _principal(request, READ_SCOPE)
    page_size = _query_int(request, "page_size")
    page = await request.app[VAULT].list(
        principal.tenant_id, page_size, request.query.get("page_token", "")
    )
    return web.json_response({
        "object": "list", "data": [s.to_json() for s in page.secrets],
        "next_page_token": page.next_page_token,
    })


def _query_int(request: web.Request, name: str) -> int:
    text = request.query.get(name, "0").strip()
    if _QUERY_INT.fullmatch(text) is None:
        raise FederationError(ErrorCode.INVALID_ARGUMENT, f"{name} must be an integer",
                              param=name)
    return int(text)


async def read_secret(request: web.Request) -> web.Response:
    principal = await _principal(request, READ_SCOPE)
    info, value = await request.app[VAULT].read(
        tenant_id=principal.tenant_id, secret_id=request.match_info["id"],
        client_share=_share(request), actor=principal.key_id,
    )
    try:
        text: str | None = value.decode()
    except UnicodeDecodeError:
        text = None
    return web.json_response(
        {**info.to_json(), "value": text, "value_base64": base64.b64encode(value).decode()},
        headers=_NO_STORE,
    )


async def rotate_secret(request: web.Request) -> web.Response:
    principal = await _principal(request, WRITE_SCOPE)
    issued = await request.app[VAULT].rotate(
        tenant_id=principal.tenant_id, secret_id=request.match_info["id"],
        client_share=_share(request), actor=principal.key_id,
    )
    return web.json_response({**issued.info.to_json(), "client_share": issued.client_share},
                             headers=_NO_STORE)


async def recover_secret(request: web.Request) -> web.Response:
    principal = await _principal(request, ADMIN_SCOPE)
    body = _json(request)
    issued = await request.app[VAULT].recover(
        tenant_id=None, secret_id=request.match_info["id"],
        requested_by_key_id=principal.key_id, reason=_string(body, "reason"),
    )
    return web.json_response({**issued.info.to_json(), "client_share": issued.client_share},
                             headers=_NO_STORE)


async def destroy_secret(request: web.Request) -> web.Response:
    principal = await _principal(request, WRITE_SCOPE)
    body = _json(request)
    reason = request.query.get("reason") or _string(body, "reason") or (
        f"destroyed by {principal.key_id}"
    )
    info = await request.app[VAULT].destroy(
        tenant_id=principal.tenant_id, secret_id=request.match_info["id"], reason=reason,
        actor=principal.key_id,
    )
    return web.json_response(info.to_json())
