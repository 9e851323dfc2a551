"""The authorization table is data; these tests keep it honest."""

from __future__ import annotations

from federation import authz
from federation.config import ALL_ROLES
from federation.v1 import (
    council_pb2,
    edge_broker_pb2,
    guardian_pb2,
    inference_pb2,
    key_authority_pb2,
    thermal_memory_pb2,
)

_FILES = (council_pb2, edge_broker_pb2, guardian_pb2, inference_pb2, key_authority_pb2,
          thermal_memory_pb2)


def _all_methods() -> set[str]:
    methods = set()
    for module in _FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_every_pattern_names_real_methods() -> None:
    methods = _all_methods()
    for pattern in authz.patterns():
        if pattern.endswith("*"):
            assert any(m.startswith(pattern[:-1]) for m in methods), pattern
        else:
            assert pattern in methods, f"{pattern} is not a method of any service"


def test_every_method_is_reachable_by_admin_and_only_listed_roles() -> None:
    for method in _all_methods():
        assert authz.is_allowed("admin", method), method
    assert set(authz.ROLE_METHODS) <= set(ALL_ROLES)


def test_methods_open_to_every_identity_are_health_and_reflection_only() -> None:
    assert {p.split("/")[1] for p in authz.OPEN_TO_EVERY_IDENTITY} == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


def test_edge_devices_reach_only_the_broker_device_methods() -> None:
    allowed = {m for m in _all_methods() if authz.is_allowed("edge", m)}
    assert allowed and all(m.startswith("/federation.v1.EdgeBrokerService/") for m in allowed)
    assert "/federation.v1.EdgeBrokerService/SubmitJob" not in allowed
    assert not any(authz.is_allowed("edge", m) for m in _all_methods()
                   if "/federation.v1.GuardianService/" in m or "/KeyAuthorityService/" in m)


def test_unknown_role_and_unknown_method_are_denied() -> None:
    assert not authz.is_allowed("nobody", "/federation.v1.GuardianService/ReleaseShare")
    assert not authz.is_allowed("gateway", "/federation.v1.GuardianService/Nope")
    assert authz.roles_allowed("/federation.v1.KeyAuthorityService/IssueKey") == ["admin"]
