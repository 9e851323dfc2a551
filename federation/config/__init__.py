"""All configuration, in one typed place: import every name from ``federation.config``.

Settings are frozen dataclasses, one section per concern, with a docstring per
field saying why its default is what it is. ``processes`` holds how the
federation's processes run and reach each other, ``services`` what each service
and the gateway may do, ``settings`` the whole (:class:`Settings`) and where its
values come from (flags, environment, ``federation.toml``, defaults).
"""

from federation.config.processes import (
    ALL_ROLES,
    CLIENT_ONLY_ROLES,
    ROLES_WITH_SERVICES,
    ConfigError,
    DatabaseConfig,
    GrpcConfig,
    NodeConfig,
    PeersConfig,
    SupervisorConfig,
)
from federation.config.services import (
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
from federation.config.settings import Settings, load_settings

__all__ = [
    "ALL_ROLES",
    "CLIENT_ONLY_ROLES",
    "ROLES_WITH_SERVICES",
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
    "Settings",
    "SupervisorConfig",
    "VaultConfig",
    "load_settings",
]
