"""All configuration, in one typed place: import every name from ``federation.config``.

Settings are frozen dataclasses, one section per concern, with a docstring per
field saying why its default is what it is. :class:`Settings` (here) holds every
section; ``processes`` has the sections of how the federation's processes run and
reach each other, ``services`` what each service and the gateway may do, and
``loading`` where the values come from (flags, environment, ``federation.toml``,
defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.config import checks, loading
from federation.config.processes import (
    ALL_ROLES,
    CLIENT_ONLY_ROLES,
    ROLES_WITH_SERVICES,
    ConfigError,
    DatabaseConfig,
    GrpcConfig,
    NodeConfig,
    PeersConfig,
    PkiConfig,
    SupervisorConfig,
    TracingConfig,
)
from federation.config.services import (
    BackupConfig,
    CouncilConfig,
    EdgeConfig,
    GatewayConfig,
    GuardianConfig,
    InferenceConfig,
    KeysConfig,
    MemoryConfig,
    ModelConfig,
    VaultConfig,
)


@dataclass(frozen=True)
class Settings:
    """Everything a federation process needs, resolved once at start."""

    home: Path = Path(".federation")
    """The federation home: PKI, embedded database, endpoints.json."""

    trust_domain: str = "federation.local"
    """SPIFFE trust domain of every identity this federation issues."""

    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR (any case); ``federation up`` hands it to its children."""

    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    nodes: NodeConfig = field(default_factory=NodeConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    guardian: GuardianConfig = field(default_factory=GuardianConfig)
    vault: VaultConfig = field(default_factory=VaultConfig)
    council: CouncilConfig = field(default_factory=CouncilConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    pki: PkiConfig = field(default_factory=PkiConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    node_name: str = "local"
    """Name part of this host's node identities (``spiffe://…/node/<name>/<role>``)."""

    @property
    def endpoints_file(self) -> Path:
        return self.home / "endpoints.json"

    def port_for(self, role: str) -> int:
        return int(getattr(self.nodes, f"{role}_port"))


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings from flags (``overrides``), the environment and the file.

    ``overrides`` uses dotted names: ``{"gateway.http_port": 9000, "home": "/x"}``;
    ``None`` values are ignored so that unset flags fall through. A value out of its
    range, or limits that disagree, raise :class:`ConfigError` naming the setting.
    """
    settings = _files_in_home(loading.load(Settings, Settings.home, overrides, environ))
    checks.check(settings)
    return settings


def _files_in_home(settings: Settings) -> Settings:
    """A relative ``inference.models[].gguf_path`` names a file in the home, as every other
    file setting does, not in whatever directory the command was started from. Resolved
    here because a model's settings reach its backend without the home."""
    models = tuple(
        dataclasses.replace(model, gguf_path=str(settings.home / model.gguf_path))
        if model.gguf_path and not Path(model.gguf_path).is_absolute() else model
        for model in settings.inference.models)
    if models == settings.inference.models:
        return settings
    return dataclasses.replace(
        settings, inference=dataclasses.replace(settings.inference, models=models))


__all__ = [
    "ALL_ROLES",
    "CLIENT_ONLY_ROLES",
    "ROLES_WITH_SERVICES",
    "BackupConfig",
    "ConfigError",
    "CouncilConfig",
    "DatabaseConfig",
    "EdgeConfig",
    "GatewayConfig",
    "GrpcConfig",
    "GuardianConfig",
    "InferenceConfig",
    "KeysConfig",
    "MemoryConfig",
    "ModelConfig",
    "NodeConfig",
    "PeersConfig",
    "PkiConfig",
    "Settings",
    "SupervisorConfig",
    "TracingConfig",
    "VaultConfig",
    "load_settings",
]
