"""CouncilService: the contract is in protos/federation/v1; behaviour lands with issue #6."""

from __future__ import annotations

from federation.server import ServiceRegistration, pending_service
from federation.v1 import council_pb2_grpc
from nodes.runtime import NodeRuntime


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    return pending_service(council_pb2_grpc, "CouncilService", issue=6)
