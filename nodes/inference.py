"""The inference node's gRPC service: a thin adapter over a :class:`BackendSet`.

Generate forwards each delta as soon as the backend produces it. If the caller
cancels, grpc.aio cancels this handler's task; the cancellation reaches the
backend's iterator (closed by ``aclosing``), which stops the generation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from federation.inference.backend import BackendSet, build_backend_set
from federation.inference.convert import finished_to_pb, model_to_pb, request_from_pb
from federation.inference.types import TokenDelta
from federation.server import ServiceRegistration
from federation.v1 import inference_pb2, inference_pb2_grpc
from nodes.runtime import NodeRuntime

SERVICE_NAME = "federation.v1.InferenceService"

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backends: BackendSet) -> None:
        self._backends = backends

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[model_to_pb(m) for m in self._backends.models()]
        )

    async def GetLoad(
        self, request: inference_pb2.GetLoadRequest, context: Context
    ) -> inference_pb2.GetLoadResponse:
        load = self._backends.load()
        return inference_pb2.GetLoadResponse(
            in_flight=load.in_flight, queued=load.queued, queue_capacity=load.capacity
        )

    async def Generate(  # type: ignore[override]
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        started = time.perf_counter()
        first_token: float | None = None
        index = 0
        events = self._backends.generate(request_from_pb(request))
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TokenDelta):
                    if first_token is None:
                        first_token = time.perf_counter() - started
                    yield inference_pb2.GenerateResponse(
                        delta=inference_pb2.TokenDelta(text=event.text, index=index)
                    )
                    index += 1
                    continue
                finished = finished_to_pb(event)
                finished.total_time.FromNanoseconds(int((time.perf_counter() - started) * 1e9))
                ttft = first_token if first_token is not None else time.perf_counter() - started
                finished.time_to_first_token.FromNanoseconds(int(ttft * 1e9))
                yield inference_pb2.GenerateResponse(finished=finished)
                return


def registration(servicer: InferenceServicer) -> ServiceRegistration:
    return ServiceRegistration(
        SERVICE_NAME,
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
    )


async def create_service(runtime: NodeRuntime) -> ServiceRegistration:
    backends = build_backend_set(runtime.settings.inference)
    # Registered first: a backend that fails to start must not leak the others.
    runtime.cleanup.push_async_callback(backends.stop)
    await backends.start()
    return registration(InferenceServicer(backends))
