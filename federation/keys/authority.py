"""The key authority: issue, verify, revoke, rotate, list, strength history.

Hot path: ``verify`` of a known key touches no database. Key records are
cached in-process (bounded, short TTL, dropped at once on revoke/rotate here);
verified uses are folded into a per-key decayed accumulator in memory and
flushed in one statement per period (still O(1) per event). Failed attempts
are written and audited at once: they are security events.

Fail closed: every state change runs in a transaction whose last step, before
commit, is writing its audit record; if the audit write fails, nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import asyncpg

from federation.config import KeysConfig
from federation.db.errors import log_job_failure
from federation.errors import ErrorCode, FederationError
from federation.fields import bounded, storable
from federation.keys import keyformat
from federation.keys import repository as repo
from federation.keys.cache import CachedKey, KeyCache, SourceState
from federation.keys.models import (
    MAX_SOURCE_CHARS,
    SCOPES,
    IssuedKey,
    IssueRequest,
    KeyRecord,
    KeyState,
    KeyView,
    Page,
    StrengthKind,
    StrengthSample,
    check_duration,
)
from federation.keys.strength import (
    BURST_WINDOW_SECONDS,
    Accumulator,
    StrengthParams,
    failure_anomaly,
    is_burst,
    key_strength,
    normalised,
    source_strength,
    use_anomaly,
)
from federation.memory.records import AuditEntry
from federation.memory.sink import AuditSink
from federation.paging import invalid_page_token, sequence_token
from federation.paging import page_size as checked_page_size
from federation.periodic import cancel_and_wait
from federation.tenancy import checked_tenant_id

log = logging.getLogger(__name__)

DEFAULT_LIST_PAGE = 50
MAX_REASON_CHARS = 1000
"""A revocation's reason, as the guardian bounds a release's: megabytes of it made an
audit record that no search page could carry."""
DEFAULT_HISTORY_PAGE = 100
Clock = Callable[[], float]


@dataclass
class _PendingUse:
    tenant_id: str
    usage: Accumulator
    last_used: float
    sources: set[str]


def hash_key(full_key: str) -> bytes:
    """Secrets are 256 random bits, so a fast hash is right (no KDF needed)."""
    return hashlib.sha256(full_key.encode()).digest()


def suspended_error(key_id: str) -> FederationError:
    return FederationError(
        ErrorCode.PERMISSION_DENIED,
        f"API key {key_id} is suspended: its strength fell below the minimum. "
        f"Rotate it to get a new secret: `federation keys rotate {key_id}`",
    )


def source_suspended_error(key_id: str) -> FederationError:
    return FederationError(
        ErrorCode.PERMISSION_DENIED,
        f"API key {key_id} is suspended for requests from this source after repeated failed "
        f"attempts. Rotate it (`federation keys rotate {key_id}`) or wait for the failures "
        "to age out",
    )


_INVALID_KEY = "invalid API key"


class KeyAuthority:
    """``start()`` runs the use flusher; ``stop()`` flushes and ends it."""

    def __init__(
        self, pool: asyncpg.Pool, config: KeysConfig, audit: AuditSink, *,
        clock: Clock = time.time,
    ) -> None:
        self._pool = pool
        self._config = config
        self.params = StrengthParams.from_config(config)
        self._audit_sink = audit
        self._clock = clock
        self.clock = clock
        self._cache = KeyCache(pool, config.cache_ttl_seconds, config.cache_size)
        self._pending: dict[str, _PendingUse] = {}
        self._flusher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="key-use-flusher")

    async def stop(self) -> None:
        await cancel_and_wait(self._flusher)
        self._flusher = None
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.use_flush_interval_seconds)
            try:
                await self.flush()
            except Exception as exc:  # keep flushing; the uses were put back
                log_job_failure(log, "flushing key uses failed", exc)

    # -- issue / revoke / rotate -----------------------------------------------------------

    async def issue(self, request: IssueRequest, actor: str) -> IssuedKey:
        request = request.validated()
        parts, full_key = keyformat.generate()
        now = self._now_dt()
        expires = now + dt.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        record = KeyRecord(
            tenant_id=request.tenant_id, key_id=parts.key_id, scopes=tuple(request.scopes),
            description=request.description, stored_state=KeyState.ACTIVE,
            secret_hash=hash_key(full_key), old_secret_hash=None, old_secret_until=None,
            created_at=now, strength_epoch=now, usage=Accumulator(0.0, now.timestamp()),
            last_used_at=None, expires_at=expires, revoked_at=None,
            requests_per_minute=request.requests_per_minute, token_quota=request.token_quota,
            quota_period_seconds=request.quota_period_seconds,
        )
        async with self._transaction() as conn:
            await repo.insert_key(conn, record)
            await self._sample(conn, record, StrengthKind.ISSUED, now)
            await self._audit(AuditEntry(
                actor=actor, action="key.issue", tenant_id=record.tenant_id,
                subject=record.key_id, attributes={"scopes": ",".join(record.scopes)},
            ))
        return IssuedKey(self.view(record), full_key)

    async def revoke(
        self, key_id: str, tenant_id: str | None, actor: str, reason: str = ""
    ) -> KeyView:
        """Permanently disable a key. Revoking a revoked key changes nothing."""
        keyformat.validate_key_id(key_id)
        storable(reason, "reason")  # else the audit write fails, reported as an outage
        if len(reason) > MAX_REASON_CHARS:  # it is copied into the audit record
            raise FederationError(ErrorCode.INVALID_ARGUMENT, "reason is longer than "
                                  f"{MAX_REASON_CHARS} characters", param="reason")
        now = self._now_dt()
        async with self._transaction() as conn:
            record = await self._locked(conn, key_id, tenant_id)
            if record.stored_state is KeyState.REVOKED:
                return self.view(record)
            record = await repo.set_state(conn, record, KeyState.REVOKED, now)
            await self._sample(conn, record, StrengthKind.REVOCATION, now)
            await self._audit(AuditEntry(
                actor=actor, action="key.revoke", tenant_id=record.tenant_id,
                subject=key_id, attributes={"reason": reason},
            ))
        self._cache.drop(key_id)
        return self.view(record)

    async def rotate(
        self, key_id: str, tenant_id: str | None, actor: str, grace_seconds: float
    ) -> IssuedKey:
        """New secret, same key id/scopes/quotas; the old secret works for the grace period."""
        keyformat.validate_key_id(key_id)
        check_duration(grace_seconds, "grace_period", zero_allowed=True)
        _, full_key = keyformat.generate(key_id)
        now = self._now_dt()
        old_until = now + dt.timedelta(seconds=grace_seconds) if grace_seconds > 0 else None
        async with self._transaction() as conn:
            record = await self._locked(conn, key_id, tenant_id)
            if record.stored_state is KeyState.REVOKED:
                raise FederationError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"API key {key_id} is revoked and cannot be rotated; issue a new key",
                )
            record = await repo.rotate_secret(conn, record, hash_key(full_key), old_until, now)
            await self._sample(conn, record, StrengthKind.ROTATION, now)
            await self._audit(AuditEntry(
                actor=actor, action="key.rotate", tenant_id=record.tenant_id, subject=key_id,
                attributes={"grace_seconds": f"{grace_seconds:g}"},
            ))
        self._cache.drop(key_id)
        self._pending.pop(key_id, None)
        return IssuedKey(self.view(record), full_key, old_until)

    async def suspend(self, record: KeyRecord, actor: str, reason: str) -> bool:
        """Suspend an active key (strength below minimum). False if it was not active."""
        now = self._now_dt()
        async with self._transaction() as conn:
            current = await self._locked(conn, record.key_id, record.tenant_id)
            if current.stored_state is not KeyState.ACTIVE:
                return False
            current = await repo.set_state(conn, current, KeyState.SUSPENDED, now)
            await self._sample(conn, current, StrengthKind.SUSPENSION, now)
            await self._audit(AuditEntry(
                actor=actor, action="key.suspend", tenant_id=current.tenant_id,
                subject=current.key_id, attributes={"reason": reason},
            ))
        self._cache.drop(record.key_id)
        return True

    # -- reads -----------------------------------------------------------------------------

    async def get(self, key_id: str, tenant_id: str | None) -> KeyView:
        keyformat.validate_key_id(key_id)
        record = await repo.get_key(self._pool, key_id, tenant_id)
        if record is None:
            raise _not_found(key_id)
        return self.view(record)

    async def list_keys(
        self, tenant_id: str, *, include_revoked: bool = False, page_size: int = 0,
        page_token: str = "",
    ) -> Page[KeyView]:
        checked_tenant_id(tenant_id)  # as IssueKey checks it: no such key otherwise
        size = checked_page_size(page_size, DEFAULT_LIST_PAGE)
        records = await repo.list_keys(
            self._pool, tenant_id, include_revoked=include_revoked,
            after=_list_cursor(page_token), limit=size + 1,
        )
        views = [self.view(r) for r in records[:size]]
        token = ""
        if len(records) > size:
            last = records[size - 1]
            token = f"{repo.posix(last.created_at)!r}|{last.key_id}"
        return Page(views, token)

    async def history(
        self, key_id: str, tenant_id: str | None, *, page_size: int = 0, page_token: str = ""
    ) -> Page[StrengthSample]:
        view = await self.get(key_id, tenant_id)
        size = checked_page_size(page_size, DEFAULT_HISTORY_PAGE)
        before = _int_token(page_token)
        rows = await repo.strength_history(
            self._pool, view.record.tenant_id, key_id, before_id=before, limit=size + 1
        )
        token = str(rows[size - 1][0]) if len(rows) > size else ""
        return Page([sample for _, sample in rows[:size]], token)

    def view(self, record: KeyRecord) -> KeyView:
        now = self._clock()
        return KeyView(record, record.state_at(repo.from_posix(now)),
                       normalised(self.params, self._strength(record, now)))

    # -- verify (hot path) -----------------------------------------------------------------

    async def verify(self, presented: str, source: str, required_scope: str = "") -> KeyView:
        """Authenticate ``presented`` from ``source``; check ``required_scope``."""
        if required_scope and required_scope not in SCOPES:
            # The caller's mistake, not the key holder's: refused before the key is
            # looked at, not counted as a failed attempt that weakens the key.
            raise FederationError(ErrorCode.INVALID_ARGUMENT,
                                  f"required_scope {required_scope[:64]!r} is not a scope",
                                  param="required_scope")
        parsed = keyformat.parse(presented)
        bounded(source, "source", MAX_SOURCE_CHARS)  # written with a failed attempt
        full_key = keyformat.format_key(parsed.key_id, parsed.secret)
        now = self._clock()
        cached = await self._cache.get(parsed.key_id, now)
        if cached is None:
            await self._audit_unknown(parsed.key_id, source)
            raise FederationError(ErrorCode.UNAUTHENTICATED, _INVALID_KEY)
        record = cached.record
        if not self._secret_matches(record, full_key, now):
            suspended = await self._record_failure(cached, source, "wrong_secret", now)
            if suspended:
                raise source_suspended_error(record.key_id)
            raise FederationError(ErrorCode.UNAUTHENTICATED, _INVALID_KEY)
        strength = await self._check_usable(cached, source, now)
        if not record.grants(required_scope):
            await self._record_failure(cached, source, "missing_scope", now)
            raise FederationError(
                ErrorCode.PERMISSION_DENIED,
                f"API key {record.key_id} lacks the {required_scope!r} scope",
            )
        self._note_use(cached, source, now)
        return KeyView(record, KeyState.ACTIVE, normalised(self.params, strength))

    def _secret_matches(self, record: KeyRecord, full_key: str, now: float) -> bool:
        digest = hash_key(full_key)
        if hmac.compare_digest(digest, record.secret_hash):
            return True
        old, until = record.old_secret_hash, record.old_secret_until
        return (
            old is not None and until is not None and now < until.timestamp()
            and hmac.compare_digest(digest, old)
        )

    async def _check_usable(self, cached: CachedKey, source: str, now: float) -> float:
        record = cached.record
        state = record.state_at(repo.from_posix(now))
        if state is KeyState.REVOKED:
            raise FederationError(ErrorCode.UNAUTHENTICATED,
                                  f"API key {record.key_id} has been revoked")
        if state is KeyState.EXPIRED:
            raise FederationError(ErrorCode.UNAUTHENTICATED,
                                  f"API key {record.key_id} has expired")
        if state is KeyState.SUSPENDED:
            raise suspended_error(record.key_id)
        strength = self._strength(record, now)
        if strength < self.params.minimum:
            await self.suspend(record, "keys", "strength below minimum at verification")
            raise suspended_error(record.key_id)
        source_state = cached.sources.get(source)
        if source_state is not None and self._source_suspended(strength, source_state, now):
            raise source_suspended_error(record.key_id)
        return strength

    def _source_suspended(self, strength: float, state: SourceState, now: float) -> bool:
        return source_strength(self.params, strength, state.failures, now) < self.params.minimum

    def _strength(self, record: KeyRecord, now: float) -> float:
        pending = self._pending.get(record.key_id)
        usage = record.usage
        if pending is not None:
            usage = usage.merge(pending.usage, self.params.tau_seconds)
        return key_strength(self.params, record.strength_epoch.timestamp(), usage, now)

    def _note_use(self, cached: CachedKey, source: str, now: float) -> None:
        record = cached.record
        cached.recent_uses = cached.recent_uses.add(now, 1.0, BURST_WINDOW_SECONDS)
        burst = is_burst(self.params, cached.recent_uses, record.usage, now)
        amount = self.params.use_weight * use_anomaly(self.params, burst=burst)
        pending = self._pending.get(record.key_id)
        if pending is None:
            pending = _PendingUse(record.tenant_id, Accumulator(0.0, now), now, set())
            self._pending[record.key_id] = pending
        pending.usage = pending.usage.add(now, amount, self.params.tau_seconds)
        pending.last_used = now
        pending.sources.add(source)

    async def _record_failure(
        self, cached: CachedKey, source: str, reason: str, now: float
    ) -> bool:
        """Account and audit one failed attempt; True if ``source`` is now suspended."""
        record = cached.record
        previous = cached.sources.get(source)
        burst = previous.burst if previous else Accumulator()
        anomaly = failure_anomaly(
            self.params,
            unusual_source=not (previous and previous.verified),
            burst=is_burst(self.params, burst.add(now, 1.0, BURST_WINDOW_SECONDS),
                           record.usage, now),
        )
        now_dt = repo.from_posix(now)
        strength = self._strength(record, now)
        async with self._transaction() as conn:
            row = await repo.add_failure(
                conn, record, source, self.params.failure_weight * anomaly, now_dt,
                self.params.tau_seconds, BURST_WINDOW_SECONDS,
            )
            state = SourceState.from_row(row)
            seen = source_strength(self.params, strength, state.failures, now)
            await repo.add_samples(conn, [(record.tenant_id, record.key_id, StrengthSample(
                now_dt, normalised(self.params, seen), StrengthKind.FAILED_ATTEMPT, source))])
            await self._audit(AuditEntry(
                actor=source or "unknown", action="key.verify_failed",
                tenant_id=record.tenant_id, subject=record.key_id,
                attributes={"reason": reason, "source": source, "anomaly": f"{anomaly:g}"},
            ))
            suspended = seen < self.params.minimum
            if suspended and await repo.mark_source_suspended(conn, record, source, now_dt):
                await self._audit(AuditEntry(
                    actor="keys", action="key.source_suspend", tenant_id=record.tenant_id,
                    subject=record.key_id, attributes={"source": source},
                ))
        cached.sources[source] = replace(state, suspended=suspended)
        return suspended

    async def _audit_unknown(self, key_id: str, source: str) -> None:
        await self._audit(AuditEntry(
            actor=source or "unknown", action="key.verify_failed", subject=key_id,
            attributes={"reason": "unknown_key", "source": source},
        ))

    # -- flushing uses ---------------------------------------------------------------------

    async def flush(self) -> int:
        """Write the verified uses gathered since the last flush; returns keys written."""
        pending, self._pending = self._pending, {}
        if not pending:
            return 0
        tau = self.params.tau_seconds
        batch = [
            (p.tenant_id, key_id, p.usage.value, repo.from_posix(p.usage.at),
             repo.from_posix(p.last_used))
            for key_id, p in pending.items()
        ]
        sources = [(p.tenant_id, k, s) for k, p in pending.items() for s in p.sources]
        try:
            async with self._transaction() as conn:
                rows = await repo.flush_uses(conn, batch, tau)
                records = [repo.key_from_row(r) for r in rows]
                now = self._clock()
                await repo.add_samples(conn, [
                    (r.tenant_id, r.key_id, StrengthSample(
                        repo.from_posix(now), normalised(self.params, self._strength(r, now)),
                        StrengthKind.VERIFIED_USE, ""))
                    for r in records
                ])
                await repo.mark_sources_verified(conn, sources, repo.from_posix(now))
        except Exception:
            self._restore(pending)
            raise
        self._cache.refresh_usage(records)
        return len(records)

    def _restore(self, pending: dict[str, _PendingUse]) -> None:
        for key_id, use in pending.items():
            newer = self._pending.get(key_id)
            if newer is not None:
                use.usage = use.usage.merge(newer.usage, self.params.tau_seconds)
                use.sources |= newer.sources
                use.last_used = max(use.last_used, newer.last_used)
            self._pending[key_id] = use

    # -- helpers ---------------------------------------------------------------------------

    def _now_dt(self) -> dt.datetime:
        return repo.from_posix(self._clock())

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[repo.Executor]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def _locked(self, conn: repo.Executor, key_id: str, tenant_id: str | None) -> KeyRecord:
        record = await repo.get_key(conn, key_id, tenant_id, for_update=True)
        if record is None:
            raise _not_found(key_id)
        return record

    async def _sample(
        self, conn: repo.Executor, record: KeyRecord, kind: StrengthKind, now: dt.datetime
    ) -> None:
        strength = normalised(self.params, self._strength(record, now.timestamp()))
        await repo.add_samples(conn, [(record.tenant_id, record.key_id,
                                       StrengthSample(now, strength, kind, ""))])

    async def _audit(self, entry: AuditEntry) -> None:
        """Write the audit record or fail the action (fail closed)."""
        try:
            await self._audit_sink.record(entry)
        except Exception as exc:
            log.error("audit write failed; refusing the action",
                      extra={"action": entry.action, "subject": entry.subject,
                             "error": repr(exc)})
            raise FederationError(
                ErrorCode.UNAVAILABLE,
                f"the audit log could not record {entry.action}; nothing was changed",
            ) from exc


def _not_found(key_id: str) -> FederationError:
    return FederationError(ErrorCode.NOT_FOUND, f"no API key {key_id}", param="key_id")




def _int_token(token: str) -> int | None:
    return sequence_token(token) if token else None


def _list_cursor(token: str) -> tuple[dt.datetime, str] | None:
    """The (creation time, key id) a ListKeys token names. A time past ``datetime``'s
    range ("inf", "1e300") raises OverflowError, not ValueError, and a key id that is
    not one would reach the query: both are a bad token."""
    if not token:
        return None
    try:
        seconds, key_id = token.split("|", 1)
        return repo.from_posix(float(seconds)), keyformat.validate_key_id(key_id)
    except (ValueError, OverflowError, OSError, FederationError):
        raise invalid_page_token() from None
