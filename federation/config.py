"""All configuration, in one typed place.

Settings are frozen dataclasses. Values come from, in decreasing priority:
command-line flags, environment variables, the TOML file
``$FEDERATION_HOME/federation.toml``, then the defaults written here.

Environment variables are named ``FEDERATION_<SECTION>_<FIELD>`` (for example
``FEDERATION_GATEWAY_HTTP_PORT``); ``FEDERATION_HOME`` and
``FEDERATION_DATABASE_URL`` are the two documented short forms. Nothing in the
project reads ``os.environ`` outside this module.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES_WITH_SERVICES: tuple[str, ...] = ("keys", "memory", "guardian", "inference", "council", "broker")
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


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL: an external cluster through ``url``, or the embedded one."""

    url: str = ""
    """DSN of an external PostgreSQL (``FEDERATION_DATABASE_URL``). Empty: embedded."""

    embedded_port: int = 0
    """TCP port of the embedded PostgreSQL on 127.0.0.1. 0 picks a free one."""

    pool_min_size: int = 1
    pool_max_size: int = 10
    """asyncpg pool bounds per process."""

    command_timeout_seconds: float = 10.0


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
    startup_timeout_seconds: float = 60.0
    """How long ``federation up`` waits for every role to report SERVING."""


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
class GatewayConfig:
    """The aiohttp OpenAI-compatible HTTP gateway."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    max_body_bytes: int = 1024 * 1024
    """Larger request bodies are refused with 413."""

    health_timeout_seconds: float = 2.0
    """Per-component deadline of a ``GET /health`` probe."""


@dataclass(frozen=True)
class Settings:
    """Everything a federation process needs, resolved once at start."""

    home: Path = Path(".federation")
    """The federation home: PKI, embedded database, endpoints.json."""

    trust_domain: str = "federation.local"
    """SPIFFE trust domain of every identity this federation issues."""

    log_level: str = "INFO"
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    nodes: NodeConfig = field(default_factory=NodeConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    node_name: str = "local"
    """Name part of this host's node identities (``spiffe://…/node/<name>/<role>``)."""

    @property
    def endpoints_file(self) -> Path:
        return self.home / "endpoints.json"

    def port_for(self, role: str) -> int:
        return int(getattr(self.nodes, f"{role}_port"))


_SHORT_ENV_NAMES = {
    "FEDERATION_HOME": ("home",),
    "FEDERATION_DATABASE_URL": ("database", "url"),
}


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings from flags (``overrides``), the environment and the file.

    ``overrides`` uses dotted names: ``{"gateway.http_port": 9000, "home": "/x"}``;
    ``None`` values are ignored so that unset flags fall through.
    """
    environ = os.environ if environ is None else environ
    flat: dict[str, Any] = {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    env_values = _from_environ(environ)
    home = Path(flags.get("home") or env_values.get("home") or Settings.home)
    flat.update(_from_file(home / "federation.toml"))
    flat.update(env_values)
    flat.update(flags)
    flat["home"] = str(home)
    return _build(Settings, flat, prefix="")


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, path in _SHORT_ENV_NAMES.items():
        if environ.get(name):
            values[".".join(path)] = environ[name]
    for section in dataclasses.fields(Settings):
        section_type = _section_type(section)
        if section_type is None:
            env_name = f"FEDERATION_{section.name.upper()}"
            if env_name not in _SHORT_ENV_NAMES and env_name in environ:
                values[section.name] = environ[env_name]
            continue
        for item in dataclasses.fields(section_type):
            env_name = f"FEDERATION_{section.name.upper()}_{item.name.upper()}"
            if env_name in environ and env_name not in _SHORT_ENV_NAMES:
                values[f"{section.name}.{item.name}"] = environ[env_name]
    return values


def _from_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    return values


def _section_type(item: dataclasses.Field[Any]) -> type | None:
    hints = typing.get_type_hints(Settings)
    hinted = hints[item.name]
    return hinted if dataclasses.is_dataclass(hinted) and isinstance(hinted, type) else None


def _build(cls: type, flat: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in flat:
        head = name[len(prefix) :].split(".", 1)[0] if name.startswith(prefix) else None
        if head is not None and head not in known:
            raise ConfigError(f"unknown setting {name!r}")
    kwargs: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        hinted = hints[item.name]
        key = prefix + item.name
        if dataclasses.is_dataclass(hinted) and isinstance(hinted, type):
            nested = {k: v for k, v in flat.items() if k.startswith(key + ".")}
            kwargs[item.name] = _build(hinted, nested, key + ".")
        elif key in flat:
            kwargs[item.name] = _coerce(key, flat[key], hinted)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hinted: Any) -> Any:
    target = hinted
    if isinstance(hinted, types.UnionType):
        target = next(t for t in typing.get_args(hinted) if t is not type(None))
    try:
        if target is bool and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
            return lowered in {"1", "true", "yes", "on"}
        if target is Path:
            return Path(value)
        return target(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} as {target.__name__}") from exc
