"""Checks of the resolved settings: each value in its range, and limits that must agree.

Run once when the settings are loaded (:func:`federation.config.load_settings`), so that
``federation up``, ``federation node`` and every command refuse a wrong value with one
line naming the setting, before anything starts: a negative timeout or a chunk larger
than a gRPC message would otherwise surface later, in a child's crash loop or as an
error that names no setting at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from federation.config.processes import ConfigError, GrpcConfig
from federation.config.services import EdgeConfig

if TYPE_CHECKING:
    from federation.config import Settings

MESSAGE_FRAMING_BYTES = 64 * 1024
"""Room a payload (a chunk, an inline job, a request body, a secret) leaves in its gRPC
message for the message's other fields."""

LONGEST_SECONDS = 100 * 365 * 86400.0
"""A century: longer durations overflow the timers and certificate dates they become."""

C_INT_MAX = 2**31 - 1
"""gRPC takes its options as C ints: a larger one is an OverflowError at the first channel."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
GATEWAY_TLS_MODES = ("off", "federation", "files")
MODEL_BACKENDS = ("llamacpp", "openai", "test", "council-scripted")

_MAY_BE_ZERO = frozenset({
    "grpc.grace_seconds",                    # cancel in-flight calls at once
    "inference.stall_timeout_seconds",       # 0 turns the watchdog off
    "inference.stall_exit_after_seconds",
    "keys.rotation_grace_seconds",           # the old secret stops at once
    "keys.cache_ttl_seconds",                # no cache
    "gateway.auth_cache_ttl_seconds",
    "gateway.auth_negative_cache_ttl_seconds",
    "edge.revocation_cache_seconds",
    "supervisor.restart_initial_delay_seconds",
    "token_delay_seconds",                   # models: no pause
})
"""Durations for which zero has a meaning; every other duration must be positive."""

_POSITIVE_INTS = frozenset({
    "grpc.max_message_bytes", "database.pool_max_size", "gateway.max_body_bytes",
    "gateway.route_attempts", "gateway.route_probe_timeouts_to_down",
    "gateway.outbox_max_records", "gateway.max_connections", "gateway.max_json_depth",
    "inference.stream_max_generations", "keys.lease_initial_requests",
    "keys.lease_max_requests", "memory.max_batch", "memory.max_batch_bytes",
    "memory.stream_max_batches_in_flight",
    "memory.append_attempts", "memory.verify_page_size",
    "edge.default_max_attempts", "edge.max_open_jobs_per_tenant",
    "edge.inline_payload_max_bytes", "edge.chunk_min_bytes", "edge.chunk_max_bytes",
    "edge.upload_quota_bytes", "edge.upload_commit_bytes", "council.quorum",
    "council.vote_max_tokens", "council.synthesis_max_tokens",
    "guardian.checkpoint_every_records", "vault.max_value_bytes",
    "backup.min_passphrase_chars", "supervisor.crash_loop_restarts",
    "context_length",
})
"""Counts and sizes for which zero would refuse everything or loop for ever."""


def check(settings: Settings) -> None:
    """Raise :class:`ConfigError` for the first setting out of range or in conflict."""
    for section in dataclasses.fields(settings):
        value = getattr(settings, section.name)
        if dataclasses.is_dataclass(value):
            _check_section(section.name, value)
    _check_models(settings)
    _check_names(settings)
    _check_database_url(settings.database.url)
    _check_choices(settings)
    _check_grpc_options(settings)
    _check_agreement(settings)
    check_edge_limits(settings.edge, settings.grpc)


def _check_models(settings: Settings) -> None:
    seen: set[str] = set()
    for i, model in enumerate(settings.inference.models):
        where = f"inference.models[{i}]"
        _check_values(f"{where}.", model, short=True)
        _one_of(f"{where}.backend", model.backend, MODEL_BACKENDS)
        _not_empty(f"{where}.id", model.id)
        if model.id in seen:
            raise ConfigError(f"setting {where}.id: {model.id!r} is already another model's")
        seen.add(model.id)
        if model.backend == "openai":
            _not_empty(f"{where}.base_url", model.base_url)


def _check_names(settings: Settings) -> None:
    """Names that go into identities and addresses: empty, they make a certificate for
    ``spiffe://federation.local/node//keys`` or a server listening on ``:0``."""
    for name, value in (("trust_domain", settings.trust_domain),
                        ("node_name", settings.node_name),
                        ("nodes.host", settings.nodes.host),
                        ("nodes.metrics_host", settings.nodes.metrics_host),
                        ("gateway.http_host", settings.gateway.http_host)):
        _not_empty(name, value)


def _check_database_url(url: str) -> None:
    """Empty is the embedded cluster; anything else must be a libpq URL (asyncpg names
    no setting when it refuses one)."""
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("setting database.url (--database-url, FEDERATION_DATABASE_URL): "
                          "not a PostgreSQL URL (postgresql://USER@HOST[:PORT]/DATABASE), "
                          "nor empty for the embedded cluster")


def _not_empty(name: str, value: str) -> None:
    if not value.strip():
        raise ConfigError(f"setting {name}: must not be empty")


def _check_section(name: str, section: Any) -> None:
    _check_values(f"{name}.", section, short=False)


def _check_values(prefix: str, section: Any, *, short: bool) -> None:
    """Generic ranges: finite numbers, no negative count, ports, positive durations.

    ``short``: the rule sets name a model's fields without their prefix."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = prefix + item.name
        rule_name = item.name if short else name
        if not math.isfinite(value):
            raise ConfigError(f"setting {name}: must be a finite number, not {value}")
        if item.name.endswith(("_seconds", "_days")):
            _duration(name, value, may_be_zero=rule_name in _MAY_BE_ZERO)
        elif isinstance(value, int):
            _count(name, value, positive=rule_name in _POSITIVE_INTS)
            if item.name.endswith("_port") and value > 65535:
                raise ConfigError(f"setting {name}: {value} is not a port (0 to 65535)")


def _duration(name: str, value: float, *, may_be_zero: bool) -> None:
    unit = "seconds" if name.endswith("_seconds") else "days"
    if value < 0 or (value == 0 and not may_be_zero):
        raise ConfigError(f"setting {name}: must be more than 0 {unit}, not {value}")
    if value * (1 if unit == "seconds" else 86400) > LONGEST_SECONDS:
        raise ConfigError(f"setting {name}: {value} {unit} is longer than a century")


def _count(name: str, value: int, *, positive: bool) -> None:
    if value < 0 or (value == 0 and positive):
        raise ConfigError(f"setting {name}: must be at least {1 if positive else 0}, "
                          f"not {value}")


def _one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"setting {name}: must be one of "
                          f"{', '.join(map(str, allowed))}, not {value!r}")


def _between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"setting {name}: must be between {low} and {high}, not {value}")


def _check_grpc_options(settings: Settings) -> None:
    grpc = settings.grpc
    if grpc.max_message_bytes > C_INT_MAX:
        raise ConfigError(f"setting grpc.max_message_bytes: at most {C_INT_MAX}, "
                          f"not {grpc.max_message_bytes}")
    for name in ("keepalive_seconds", "reconnect_initial_backoff_seconds",
                 "reconnect_max_backoff_seconds"):
        if getattr(grpc, name) * 1000 > C_INT_MAX:  # passed in milliseconds
            raise ConfigError(f"setting grpc.{name}: at most {C_INT_MAX // 1000} seconds, "
                              f"not {getattr(grpc, name)}")


def _check_choices(settings: Settings) -> None:
    # Processes upper-case it (federation/logs.py): "debug" in the file is DEBUG.
    _one_of("log_level", settings.log_level.upper(), LOG_LEVELS)
    _one_of("gateway.tls", settings.gateway.tls, GATEWAY_TLS_MODES)
    if settings.gateway.tls == "files":
        _not_empty("gateway.tls_cert_file", settings.gateway.tls_cert_file)
        _not_empty("gateway.tls_key_file", settings.gateway.tls_key_file)
    _one_of("council.rounds", settings.council.rounds, (1, 2))
    _between("tracing.sample_ratio", settings.tracing.sample_ratio, 0.0, 1.0)
    _between("keys.lease_max_fraction", settings.keys.lease_max_fraction, 0.0, 1.0)
    _between("edge.latency_smoothing", settings.edge.latency_smoothing, 0.0, 1.0)
    # Fewer than one interval would take a device offline between two heartbeats.
    if settings.edge.offline_after_intervals < 1:
        raise ConfigError(f"setting edge.offline_after_intervals: at least 1, not "
                          f"{settings.edge.offline_after_intervals}")
    for name in ("edge.latency_threshold_ms", "council.temperature", "keys.decay_per_day",
                 "keys.burst_floor_per_minute"):
        section, field = name.split(".")
        if getattr(getattr(settings, section), field) < 0:
            raise ConfigError(f"setting {name}: must not be negative")
    for name in ("keys.unusual_source_factor", "keys.burst_factor",
                 "keys.burst_multiplier", "council.repeat_penalty"):
        section, field = name.split(".")
        if getattr(getattr(settings, section), field) <= 0:
            raise ConfigError(f"setting {name}: must be more than 0")
    # The restore reads files of 2^14..2^20 (federation/backup/keys.py).
    _between("backup.scrypt_log2_n", settings.backup.scrypt_log2_n, 14, 20)


def _at_most(low_name: str, low: float, high_name: str, high: float) -> None:
    if low > high:
        raise ConfigError(f"setting {low_name} ({low}) must be at most {high_name} ({high})")


def _check_agreement(settings: Settings) -> None:
    """Limits that only make sense together. (A first value above a cap the code clamps
    it to, as ``edge.lease_seconds`` above ``edge.max_lease_seconds``, is allowed.)"""
    s = settings
    # asyncpg refuses to create such a pool, in every process, at start.
    _at_most("database.pool_min_size", s.database.pool_min_size,
             "database.pool_max_size", s.database.pool_max_size)
    # Acquiring a pooled connection includes connecting one.
    _at_most("database.connect_timeout_seconds", s.database.connect_timeout_seconds,
             "database.acquire_timeout_seconds", s.database.acquire_timeout_seconds)
    # A member's or the chair's deadline past the vote's own would never fire.
    _at_most("council.member_deadline_seconds", s.council.member_deadline_seconds,
             "council.overall_deadline_seconds", s.council.overall_deadline_seconds)
    _at_most("council.synthesis_deadline_seconds", s.council.synthesis_deadline_seconds,
             "council.overall_deadline_seconds", s.council.overall_deadline_seconds)
    # A fresh key below the minimum is suspended by the first decay run.
    _at_most("keys.minimum_strength", s.keys.minimum_strength,
             "keys.initial_strength", s.keys.initial_strength)
    _at_most("keys.initial_strength", s.keys.initial_strength,
             "keys.ceiling_strength", s.keys.ceiling_strength)
    _check_deadlines(settings)
    _check_message_sizes(settings)


def _check_deadlines(settings: Settings) -> None:
    s = settings
    # Past the request's own deadline a first-event timeout never fires.
    _at_most("gateway.route_first_event_timeout_seconds",
             s.gateway.route_first_event_timeout_seconds,
             "gateway.request_timeout_seconds", s.gateway.request_timeout_seconds)
    # A reservation forgotten while its request still runs would be settled twice.
    for name, longest in (("gateway.request_timeout_seconds", s.gateway.request_timeout_seconds),
                          ("council.overall_deadline_seconds",
                           s.council.overall_deadline_seconds)):
        if s.keys.unsettled_reservation_seconds <= longest:
            raise ConfigError(f"setting keys.unsettled_reservation_seconds "
                              f"({s.keys.unsettled_reservation_seconds}) must be more than "
                              f"{name} ({longest})")
    # A renewal window as long as the certificate's life reissues it at every start.
    if s.pki.renew_within_days >= s.pki.leaf_validity_days:
        raise ConfigError(f"setting pki.renew_within_days ({s.pki.renew_within_days}) must be "
                          f"less than pki.leaf_validity_days ({s.pki.leaf_validity_days})")


def _check_message_sizes(settings: Settings) -> None:
    """A request body the gateway admits travels to an inference node in one gRPC
    message: a larger one would fail in gRPC's own framing (RESOURCE_EXHAUSTED, naming
    no setting) after the gateway accepted it."""
    room = settings.grpc.max_message_bytes - MESSAGE_FRAMING_BYTES
    name, value = "gateway.max_body_bytes", settings.gateway.max_body_bytes
    if value > room:
        raise ConfigError(f"setting {name} ({value}) must leave {MESSAGE_FRAMING_BYTES} "
                          f"bytes under grpc.max_message_bytes "
                          f"({settings.grpc.max_message_bytes})")


def check_edge_limits(edge: EdgeConfig, grpc: GrpcConfig) -> None:
    """The broker's size limits must be coherent and fit in a gRPC message: else uploads,
    downloads or inline jobs the settings allow would fail in gRPC's own framing
    (RESOURCE_EXHAUSTED with no word of which setting) instead of being refused by ours."""
    if not 0 < edge.chunk_min_bytes <= edge.chunk_max_bytes:
        raise ConfigError(f"edge.chunk_min_bytes ({edge.chunk_min_bytes}) must be positive "
                          f"and at most edge.chunk_max_bytes ({edge.chunk_max_bytes})")
    room = grpc.max_message_bytes - MESSAGE_FRAMING_BYTES
    for name, value in (("chunk_max_bytes", edge.chunk_max_bytes),
                        ("inline_payload_max_bytes", edge.inline_payload_max_bytes)):
        if value > room:
            raise ConfigError(f"edge.{name} ({value}) must leave {MESSAGE_FRAMING_BYTES} "
                              f"bytes under grpc.max_message_bytes ({grpc.max_message_bytes})")
    for name in ("upload_quota_bytes", "upload_commit_bytes", "max_open_jobs_per_tenant"):
        if getattr(edge, name) <= 0:
            raise ConfigError(f"edge.{name} must be positive")
