"""How the federation's processes run and reach each other: the roles, gRPC, the
database, the nodes' ports, the supervisor and the peers' addresses."""

from __future__ import annotations

from dataclasses import dataclass

ROLES_WITH_SERVICES: tuple[str, ...] = (
    "keys", "memory", "guardian", "inference", "council", "broker",
)
"""Roles that run a gRPC daemon, in the order ``federation up`` starts them."""

CLIENT_ONLY_ROLES: tuple[str, ...] = ("gateway", "edge", "admin")
"""Roles that only ever call other nodes (the gateway serves HTTP, not gRPC)."""

ALL_ROLES: tuple[str, ...] = ROLES_WITH_SERVICES + CLIENT_ONLY_ROLES


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


@dataclass(frozen=True)
class GrpcConfig:
    """Limits and timings shared by every gRPC server and channel."""

    max_message_bytes: int = 4 * 1024 * 1024
    """gRPC's own default. Large payloads are streamed in chunks instead of raising it."""

    grace_seconds: float = 10.0
    """How long in-flight calls may run after SIGTERM before they are cancelled."""

    keepalive_seconds: float = 300.0
    """Client keepalive ping interval. Python servers refuse pings more frequent than
    5 minutes by default (GOAWAY too_many_pings), so clients match that."""

    connect_timeout_seconds: float = 5.0
    """How long a caller waits for a channel to become ready."""

    call_timeout_seconds: float = 30.0
    """Default deadline for unary calls between nodes."""

    reconnect_initial_backoff_seconds: float = 0.2
    reconnect_max_backoff_seconds: float = 5.0
    """A channel whose peer went away retries the connection after these delays, growing
    from the first to the second. gRPC's defaults (1 s, then up to 120 s) kept callers on
    503 for seconds after a supervised node was back (it restarts in about one)."""

    deny_list_file: str = "pki/denied.json"
    """Certificates every server refuses, by serial or identity (relative to the home;
    ``federation certs deny``; see ``federation/denylist.py``). Copy it to every host."""

    deny_list_reload_seconds: float = 1.0
    """How often a server looks whether the deny list changed: a denial takes effect
    everywhere within this (plus the copy to each host), with no restart."""


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL: an external cluster through ``url``, or the embedded one."""

    url: str = ""
    """DSN of an external PostgreSQL (``FEDERATION_DATABASE_URL``). Empty: embedded. On a
    deployment each node has its own login, its password in a file the DSN names and TLS
    checked against the federation's root, e.g. ``postgresql://federation_keys_login@db1:5432/
    federation?sslmode=verify-full&sslrootcert=/var/lib/federation/pki/ca.pem&passfile=…``
    (docs/deploy.md)."""

    migrate: bool = True
    """Nodes apply pending migrations at start (one machine, one owner DSN). On a deployment
    the nodes' logins may not change the schema: set false, run ``federation db migrate``
    as the owner, and a node refuses to start on a schema older than its code."""

    embedded_port: int = 0
    """TCP port of the embedded PostgreSQL on 127.0.0.1. 0 picks a free one."""

    pool_min_size: int = 1
    pool_max_size: int = 10
    """asyncpg pool bounds per process."""

    command_timeout_seconds: float = 10.0
    """Longest a single statement may run. Our statements are small; one that takes
    longer means PostgreSQL is stalled, and the caller gets UNAVAILABLE (HTTP 503)."""

    connect_timeout_seconds: float = 5.0
    """Longest a new connection (TCP, TLS, authentication) may take."""

    acquire_timeout_seconds: float = 5.0
    """Longest a caller waits for a pooled connection (connecting one included). asyncpg
    waits for ever by default; during an outage requests would pile up behind the pool."""

    probe_interval_seconds: float = 1.0
    """How often a node checks that PostgreSQL answers, to report NOT_SERVING on gRPC
    health (and 503 on the gateway's ``/health``) within about a second of an outage."""

    probe_timeout_seconds: float = 2.0
    """A probe slower than this counts as "unreachable": a stalled server looks the same
    as a dead one to a caller waiting on it."""


@dataclass(frozen=True)
class NodeConfig:
    """Where each role listens. Port 0 means a free port chosen at start."""

    host: str = "127.0.0.1"
    keys_port: int = 0
    memory_port: int = 0
    guardian_port: int = 0
    inference_port: int = 0
    council_port: int = 0
    broker_port: int = 0
    metrics_host: str = "127.0.0.1"
    keys_metrics_port: int = 0
    memory_metrics_port: int = 0
    guardian_metrics_port: int = 0
    inference_metrics_port: int = 0
    council_metrics_port: int = 0
    broker_metrics_port: int = 0
    """Each role's Prometheus port on ``metrics_host``. 0 picks a free one (under
    ``federation up``, listed in ``endpoints.json``); a deployment fixes them so
    Prometheus finds every node, and ``federation up`` uses a fixed one too."""
    startup_timeout_seconds: float = 60.0
    """How long ``federation up`` waits for every role to report SERVING."""

    def metrics_port_for(self, role: str) -> int:
        return int(getattr(self, f"{role}_metrics_port", 0))


@dataclass(frozen=True)
class SupervisorConfig:
    """How ``federation up`` restarts what it runs (nodes, gateway, embedded PostgreSQL).

    A crashed child is restarted after a delay that starts at
    ``restart_initial_delay_seconds`` and doubles with each crash, up to
    ``restart_max_delay_seconds``; ``crash_loop_restarts`` restarts within
    ``crash_loop_window_seconds`` make a crash loop: the child is reported, marked
    ``failed`` and left stopped while everything else keeps running.
    """

    restart_initial_delay_seconds: float = 0.5
    """Short: a one-off crash (an OOM kill, a stray signal) costs clients the restart
    time plus this, and the node's port is free again at once."""

    restart_max_delay_seconds: float = 30.0
    """Cap of the doubling delay: a child failing on a condition that clears (a full
    disk, a port briefly taken) is retried at least this often until it is failed."""

    crash_loop_restarts: int = 5
    """Restarts within the window that count as a crash loop. Five with the defaults
    spans about 15 s of back-off: long enough to ride out a transient fault, short
    enough that a broken configuration is reported within half a minute."""

    crash_loop_window_seconds: float = 120.0
    """Window over which restarts are counted for ``crash_loop_restarts``."""

    stable_after_seconds: float = 30.0
    """A child that has run this long counts as healthy again: its next crash is
    restarted after the initial delay, not the doubled one."""

    orphan_stop_seconds: float = 3.0
    """How long a node or the gateway whose supervisor died may take to stop
    gracefully before it exits anyway; with PostgreSQL's fast shutdown this keeps a
    killed ``federation up`` from leaving any process behind after 5 s."""


@dataclass(frozen=True)
class PkiConfig:
    """Lifetimes of the federation's certificates (``[pki]``)."""

    leaf_validity_days: float = 30.0
    """Node, gateway and admin certificates. Short, so that a stolen key is useful for
    weeks, not years; ``federation pki renew`` (a timer) replaces them well before, and
    running nodes pick the new files up without a restart."""

    renew_within_days: float = 10.0
    """``federation pki renew`` and ``federation up`` reissue a certificate expiring
    within this: a third of its life, which leaves ten days to notice a failed renewal
    (``federation_certificate_expiry_timestamp_seconds`` on every node's metrics)."""

    intermediate_validity_days: float = 365.0
    """The nodes and edge intermediates; renewing one needs the root key, brought back
    from offline once a year."""

    root_validity_days: float = 3650.0
    """The root: the one certificate every host trusts; replacing it means re-bundling
    every host, so it lives long and its key stays offline."""


@dataclass(frozen=True)
class PeersConfig:
    """Where to reach each role's gRPC service (``host:port``).

    ``federation up`` fills these in for the nodes it starts; on a real
    deployment they come from ``federation.toml`` (``[peers]``). ``inference``
    may list several nodes separated by commas.
    """

    keys: str = ""
    memory: str = ""
    guardian: str = ""
    inference: str = ""
    council: str = ""
    broker: str = ""

    def address(self, role: str) -> str:
        value = str(getattr(self, role, "") or "")
        if not value:
            raise ConfigError(f"no address configured for the {role} node (peers.{role})")
        return value.split(",")[0].strip()

    def addresses(self, role: str) -> list[str]:
        value = str(getattr(self, role, "") or "")
        return [a.strip() for a in value.split(",") if a.strip()]


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry traces (``federation/telemetry/tracing.py``). Off unless an endpoint
    is set: then no span is made at all."""

    otlp_endpoint: str = ""
    """OTLP/HTTP traces endpoint of a collector, e.g. ``http://otel-collector:4318/v1/traces``
    (Jaeger, Tempo and the OpenTelemetry Collector accept it). Empty: tracing off."""

    sample_ratio: float = 1.0
    """Share of requests traced (decided at the gateway; the nodes follow the caller's
    decision). All by default: the federation's request rates are modest."""

    export_timeout_seconds: float = 10.0
    """Longest one export to the collector may take; spans are sent in batches, off the
    request path."""
