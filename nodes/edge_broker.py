"""EdgeBrokerService: the contract is in protos/federation/v1; behaviour lands with issue #8."""

from __future__ import annotations

from federation.server import ServiceRegistration, pending_service
from federation.v1 import edge_broker_pb2_grpc
from nodes.runtime import NodeRuntime


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    return pending_service(edge_broker_pb2_grpc, "EdgeBrokerService", issue=8)
