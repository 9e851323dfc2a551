"""The one client of the inference nodes, for the gateway and the council.

The router keeps an mTLS channel to every configured inference node and a
background loop that re-probes each node's health (gRPC health checking),
models (ListModels) and load (GetLoad). A request goes to the healthy node
serving its model with the least load, where load is what this process has
in flight there plus what the node last reported beyond that. A call that
fails before its first event is retried on another node; once deltas have
flowed, a failure ends the stream with UNAVAILABLE (the text already sent
cannot be taken back), and the node is marked unhealthy until a probe says
otherwise. Other requests are unaffected.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from federation.channels import open_channel, request_id_metadata
from federation.config import GrpcConfig
from federation.errors import ErrorCode, FederationError, from_rpc_error
from federation.inference.convert import (
    delta_from_pb,
    embed_request_to_pb,
    embedding_from_pb,
    embeddings_finished_from_pb,
    finished_from_pb,
    model_from_pb,
    request_to_pb,
)
from federation.inference.streams import NodeGenerations, StreamedGeneration
from federation.inference.types import (
    Embedding,
    EmbeddingRequest,
    EmbedEvent,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    TokenDelta,
)
from federation.periodic import cancel_and_wait
from federation.pki import CertificateFiles
from federation.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

E = TypeVar("E")
_EOF: Final[object] = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from the stubs


class _CallReader:
    """A server-streaming call (``Embed``) read like a :class:`StreamedGeneration`: its
    failure raised as a FederationError."""

    __slots__ = ("_call",)

    def __init__(self, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        self._call = call

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]


_Reader = StreamedGeneration | _CallReader
"""A generation or an embedding in progress: ``read()`` its messages (raising
FederationError), ``cancel()`` it."""

INFERENCE_SERVICE = "federation.v1.InferenceService"

# Failures that say "this node, not this request": worth another node.
# DEADLINE_EXCEEDED is not among them: the deadline covers the whole request.
_RETRYABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RESOURCE_EXHAUSTED,
                        ErrorCode.CANCELLED, ErrorCode.INTERNAL})


@dataclass
class NodeState:
    address: str
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceAsyncStub
    health: health_pb2_grpc.HealthStub
    generations: NodeGenerations
    healthy: bool = False
    models: dict[str, ModelInfo] = field(default_factory=dict)
    local_in_flight: int = 0
    """Calls this process has open on the node right now."""
    others_load: int = 0
    """Running + queued work the node reported beyond ours, at the last probe."""
    probe_timeouts: int = 0
    """Consecutive probes that timed out (see ``probe_timeouts_to_down``)."""

    @property
    def score(self) -> int:
        return self.local_in_flight + self.others_load


class InferenceRouter:
    """Lifecycle: ``await start()`` … ``await stop()``."""

    def __init__(
        self,
        addresses: Sequence[str],
        credentials: CertificateFiles | None,
        grpc_config: GrpcConfig,
        *,
        refresh_seconds: float = 2.0,
        probe_timeout_seconds: float = 2.0,
        attempts: int = 3,
        first_event_timeout_seconds: float | None = None,
        probe_timeouts_to_down: int = 3,
    ) -> None:
        """``credentials=None`` uses plaintext channels (``--insecure-dev`` only)."""
        self._addresses = list(dict.fromkeys(addresses))
        self._credentials = credentials
        self._grpc_config = grpc_config
        self._refresh_seconds = refresh_seconds
        self._probe_timeout = probe_timeout_seconds
        self._attempts = max(1, attempts)
        self._first_event_timeout = first_event_timeout_seconds
        self._probe_timeouts_to_down = max(1, probe_timeouts_to_down)
        self._nodes: list[NodeState] = []
        self._refresher: asyncio.Task[None] | None = None
        self._tiebreak = itertools.count()
        self.upstream_errors = 0
        """Failed node calls (before or during a stream), for metrics."""

    @property
    def nodes(self) -> Sequence[NodeState]:
        return self._nodes

    async def start(self) -> None:
        for address in self._addresses:
            # Without interceptors: their per-message cost is paid per token here;
            # ``generate`` sends the request id itself.
            channel = open_channel(address, self._credentials, self._grpc_config,
                                   forward_request_id=False)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            self._nodes.append(NodeState(
                address, channel, stub, health_pb2_grpc.HealthStub(channel),
                NodeGenerations(channel, stub),
            ))
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(), name="inference-router")

    async def stop(self) -> None:
        await cancel_and_wait(self._refresher)
        self._refresher = None
        for node in self._nodes:
            await node.generations.close()
            await node.channel.close(None)
        self._nodes = []

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a probe bug must not end routing for good
                log.exception("inference node refresh failed")

    async def refresh(self) -> None:
        """Probe every node now (concurrently)."""
        await asyncio.gather(*(self._probe(node) for node in self._nodes))

    async def _probe(self, node: NodeState) -> None:
        timeout = self._probe_timeout
        try:
            check = await node.health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=timeout
            )
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                raise FederationError(ErrorCode.UNAVAILABLE, "not serving")
            listed = await node.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=timeout)
            local = node.local_in_flight
            load = await node.stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=timeout)
        except (grpc.aio.AioRpcError, FederationError) as exc:
            if self._still_trusted(node, exc):
                return
            if node.healthy:
                log.warning("inference node unhealthy", extra={"node": node.address,
                                                               "error": str(exc)[:200]})
            node.healthy = False
            return
        node.probe_timeouts = 0
        node.models = {m.id: model_from_pb(m) for m in listed.models}
        node.others_load = max(0, load.in_flight + load.queued - local)
        if not node.healthy:
            log.info("inference node healthy", extra={"node": node.address})
        node.healthy = True

    def _still_trusted(self, node: NodeState, error: Exception) -> bool:
        """Whether a healthy node stays in rotation despite this failed probe: only a
        timeout, and only until ``probe_timeouts_to_down`` of them in a row."""
        timed_out = (isinstance(error, grpc.aio.AioRpcError)
                     and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED)
        node.probe_timeouts = node.probe_timeouts + 1 if timed_out else 0
        if node.healthy and 0 < node.probe_timeouts < self._probe_timeouts_to_down:
            log.info("inference node slow to answer its probe; kept in rotation",
                     extra={"node": node.address, "timeouts": node.probe_timeouts})
            return True
        return False

    # ---- queries -------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """Every model some healthy node serves, once each, in a stable order."""
        seen: dict[str, ModelInfo] = {}
        for node in self._nodes:
            if node.healthy:
                for info in node.models.values():
                    seen.setdefault(info.id, info)
        return sorted(seen.values(), key=lambda m: m.id)

    def model_info(self, model: str) -> ModelInfo | None:
        """What the nodes last said about ``model`` (its context length, …); ``None`` if
        no node is known to serve it. Healthy nodes' answers are preferred."""
        known = [node.models[model] for node in sorted(self._nodes, key=lambda n: not n.healthy)
                 if model in node.models]
        return known[0] if known else None

    def check_model(self, model: str) -> None:
        """NOT_FOUND for a model no node is known to serve; UNAVAILABLE if none is up.

        A model last seen on a node that is now down counts as known, so its
        callers get "unavailable", not a misleading "does not exist".
        """
        if any(model in node.models for node in self._nodes):
            if not any(node.healthy and model in node.models for node in self._nodes):
                raise self._no_node(model)
            return
        if not any(node.healthy for node in self._nodes):
            raise self._no_node(model)
        raise FederationError(
            ErrorCode.NOT_FOUND, f"The model '{model}' does not exist", param="model"
        )

    @staticmethod
    def _no_node(model: str) -> FederationError:
        return FederationError(
            ErrorCode.UNAVAILABLE, f"no healthy inference node serves model {model}",
            retry_after_seconds=1.0,
        )

    def _candidates(self, model: str) -> list[NodeState]:
        nodes = [n for n in self._nodes if n.healthy and model in n.models]
        # Rotate before the stable sort so equally loaded nodes share the work.
        if nodes:
            shift = next(self._tiebreak) % len(nodes)
            nodes = nodes[shift:] + nodes[:shift]
        return sorted(nodes, key=lambda n: n.score)

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self, request: GenerationRequest, *, deadline_seconds: float | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream one generation from the best node, retrying elsewhere before the first event.

        Closing this iterator (or cancelling the task consuming it) cancels the
        gRPC call, which stops the generation on the node.
        """
        message = request_to_pb(request)

        async def start(node: NodeState, deadline_seconds: float | None) -> _Reader:
            return await node.generations.start(message, deadline_seconds)

        return self._stream(request.model, start, _event,
                            lambda e: not isinstance(e, TokenDelta), deadline_seconds)

    def embed(self, request: EmbeddingRequest, *, deadline_seconds: float | None = None
              ) -> AsyncGenerator[EmbedEvent, None]:
        """Embed on the best node serving the model (retried like :meth:`generate`)."""
        message = embed_request_to_pb(request)
        metadata = request_id_metadata()

        async def start(node: NodeState, deadline_seconds: float | None) -> _Reader:
            return _CallReader(node.stub.Embed(message, timeout=deadline_seconds,
                                               metadata=metadata))

        return self._stream(request.model, start, _embed_event,
                            lambda e: not isinstance(e, Embedding), deadline_seconds)

    async def _stream(self, model: str,
                      start: Callable[[NodeState, float | None], Awaitable[_Reader]],
                      decode: Callable[[Any], E], is_last: Callable[[E], bool],
                      deadline_seconds: float | None) -> AsyncGenerator[E, None]:
        self.check_model(model)
        tried: set[str] = set()
        last_error: FederationError | None = None
        for _ in range(self._attempts):
            node = next((n for n in self._candidates(model) if n.address not in tried), None)
            if node is None:
                break
            tried.add(node.address)
            node.local_in_flight += 1
            try:
                call = await start(node, deadline_seconds)
            except BaseException:
                node.local_in_flight -= 1
                raise
            try:
                try:
                    first = await self._first_event(node, call)
                except FederationError as exc:
                    if exc.code not in _RETRYABLE:
                        raise
                    last_error = exc
                    continue
                if first is None:
                    continue
                event = decode(first)
                yield event
                if not is_last(event):
                    async for event in self._rest(node, call, decode, is_last):
                        yield event
                return
            finally:
                node.local_in_flight -= 1
                call.cancel()  # no-op when finished; stops the node's work otherwise
        raise last_error or self._no_node(model)

    async def _first_event(self, node: NodeState, call: _Reader) -> Any:
        """The first message, or ``None`` when the node failed in a way worth a retry."""
        try:
            async with asyncio.timeout(self._first_event_timeout):
                response = await call.read()
        except FederationError as exc:
            self._node_failed(node, exc, before_first=True)
            raise exc from None
        except TimeoutError:
            error = FederationError(ErrorCode.UNAVAILABLE,
                                    f"inference node {node.address} sent nothing in time")
            self._node_failed(node, error, before_first=True)
            raise error from None
        if response is _EOF:
            self._node_failed(node, None, before_first=True)
            return None
        return response

    async def _rest(self, node: NodeState, call: _Reader, decode: Callable[[Any], E],
                    is_last: Callable[[E], bool]) -> AsyncGenerator[E, None]:
        while True:
            try:
                response = await call.read()
            except FederationError as error:
                self._node_failed(node, error, before_first=False)
                if error.code in _RETRYABLE:
                    raise FederationError(
                        ErrorCode.UNAVAILABLE,
                        f"the inference node failed during generation: {error.message}",
                    ) from None
                raise error from None
            if response is _EOF:
                self._node_failed(node, None, before_first=False)
                raise FederationError(
                    ErrorCode.UNAVAILABLE, "the inference node ended the stream early"
                )
            event = decode(response)
            yield event
            if is_last(event):
                return

    def _node_failed(self, node: NodeState, error: FederationError | None, *,
                     before_first: bool) -> None:
        code = error.code if error else ErrorCode.UNAVAILABLE
        if code not in _RETRYABLE:
            return  # the request's fault (bad argument, unknown model): the node is fine
        self.upstream_errors += 1
        log.warning("inference call failed", extra={
            "node": node.address, "code": code.name, "before_first_event": before_first})
        if code is ErrorCode.UNAVAILABLE:
            node.healthy = False  # until the next probe finds it serving again


def _event(response: inference_pb2.GenerateResponse) -> GenerationEvent:
    if response.WhichOneof("event") == "delta":
        return delta_from_pb(response.delta)
    return finished_from_pb(response.finished)


def _embed_event(response: inference_pb2.EmbedResponse) -> EmbedEvent:
    if response.WhichOneof("event") == "embedding":
        return embedding_from_pb(response.embedding)
    return embeddings_finished_from_pb(response.finished)
