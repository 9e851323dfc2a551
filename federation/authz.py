"""Who may call what: one table from caller role to allowed gRPC methods.

Patterns follow gRPC's authorization-policy shape (A43): a full method path
``/federation.v1.Service/Method`` or a service prefix ending in ``*``. Anything
not listed is denied. The table is data; ``tests/test_authz_table.py`` checks
that every pattern names real methods and every method is reachable by someone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Final

_PKG = "/federation.v1."

INFERENCE = _PKG + "InferenceService/"
KEYS = _PKG + "KeyAuthorityService/"
GUARDIAN = _PKG + "GuardianService/"
COUNCIL = _PKG + "CouncilService/"
BROKER = _PKG + "EdgeBrokerService/"
MEMORY = _PKG + "ThermalMemoryService/"

OPEN_TO_EVERY_IDENTITY: Final[tuple[str, ...]] = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
    "/grpc.reflection.v1.ServerReflection/*",
)
"""Methods any certificate from the federation CA may call (still mTLS)."""

_DEVICE_METHODS: Final = tuple(
    BROKER + m
    for m in (
        "RenewCertificate",
        "RegisterDevice",
        "Heartbeat",
        "HeartbeatStream",
        "LeaseJobs",
        "RenewLease",
        "CompleteJob",
        "FailJob",
        "Upload",
        "QueryUploadStatus",
        "Download",
    )
)

UNAUTHENTICATED_METHODS: Final[tuple[str, ...]] = (BROKER + "Enroll",)
"""Methods a TLS peer *without* a client certificate may call (only the broker's
enrollment port accepts such peers). Everything else answers UNAUTHENTICATED."""

_AUDIT_WRITE: Final = tuple(
    MEMORY + method for method in ("RecordMemory", "RecordMemories", "StreamMemories"))

ROLE_METHODS: Final[dict[str, tuple[str, ...]]] = {
    # Operators may do everything.
    "admin": (_PKG + "*",),
    # The HTTP gateway: verifies keys, charges quotas, routes inference and council
    # calls, audits every request, and runs the tenant vault with the guardian.
    "gateway": (
        INFERENCE + "*",
        COUNCIL + "*",
        KEYS + "VerifyKey",
        KEYS + "CheckQuota",
        KEYS + "ConsumeQuota",
        KEYS + "ReserveQuota",
        KEYS + "SettleQuota",
        KEYS + "GrantQuotaLease",
        KEYS + "SettleQuotaLease",
        MEMORY + "*",
        GUARDIAN + "DepositShare",
        GUARDIAN + "ReleaseShare",
        GUARDIAN + "DestroyShare",
        GUARDIAN + "ListShares",
        BROKER + "SubmitJob",
        BROKER + "GetJob",
        BROKER + "ListJobs",
        BROKER + "CancelJob",
        BROKER + "WatchJob",
    ),
    # The council asks inference nodes for each member's vote and audits it.
    "council": (INFERENCE + "*", *_AUDIT_WRITE),
    # Services that record their own state changes in thermal memory.
    "keys": _AUDIT_WRITE,
    "broker": _AUDIT_WRITE,
    "inference": _AUDIT_WRITE,
    # The guardian audits releases and signs checkpoints of the memory chain, each one
    # checked against the chain first.
    "guardian": (*_AUDIT_WRITE, MEMORY + "VerifyChain", MEMORY + "SearchMemory",
                 MEMORY + "GetChainLink"),
    # The memory node asks the guardian to sign chain-head checkpoints.
    "memory": (
        GUARDIAN + "SignCheckpoint", GUARDIAN + "GetCheckpoint", GUARDIAN + "ListCheckpoints",
    ),
    # Phones reach the broker's device methods and nothing else.
    "edge": _DEVICE_METHODS,
}


def _matches(pattern: str, method: str) -> bool:
    if pattern.endswith("*"):
        return method.startswith(pattern[:-1])
    return method == pattern


@functools.cache  # the table is constant; every served call asks (roles and methods are few)
def is_allowed(role: str, method: str) -> bool:
    """True when a caller holding ``role`` may call the full method path ``method``."""
    if any(_matches(p, method) for p in OPEN_TO_EVERY_IDENTITY):
        return True
    return any(_matches(p, method) for p in ROLE_METHODS.get(role, ()))


def roles_allowed(method: str) -> list[str]:
    return [role for role in ROLE_METHODS if is_allowed(role, method)]


def patterns() -> Iterable[str]:
    for allowed in ROLE_METHODS.values():
        yield from allowed
