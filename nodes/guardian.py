"""GuardianService: the contract is in protos/federation/v1; behaviour lands with issue #7."""

from __future__ import annotations

from federation.server import ServiceRegistration, pending_service
from federation.v1 import guardian_pb2_grpc
from nodes.runtime import NodeRuntime


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    return pending_service(guardian_pb2_grpc, "GuardianService", issue=7)
