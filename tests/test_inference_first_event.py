"""A node that answers nothing (a partitioned host: no refusal, no reset) must not hold a
request: after ``gateway.route_first_event_timeout_seconds`` without a first event the
router retries on another node, still before the first token."""

from __future__ import annotations

import time

from federation.config import GrpcConfig
from federation.inference.client import InferenceRouter
from federation.inference.test_backend import TestBackend
from federation.inference.types import (
    ChatMessage,
    GenerationFinished,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from tests.gateway_support import inference_nodes
from tests.support import TestPKI


async def test_a_silent_node_is_left_for_another_before_the_first_token(pki: TestPKI) -> None:
    silent, answering = TestBackend(first_token_delay=60.0), TestBackend()
    async with inference_nodes(pki, [silent, answering]) as nodes:
        router = InferenceRouter([n.address for n in nodes], pki.identity("gateway"),
                                 GrpcConfig(), refresh_seconds=60.0,
                                 first_event_timeout_seconds=0.5)
        await router.start()
        try:
            started = time.monotonic()
            for _ in range(2):  # equal nodes take turns: one of the two goes to the silent one
                request = GenerationRequest("test-model", (ChatMessage("user", "still here"),),
                                            SamplingParams())
                events = [e async for e in router.generate(request, deadline_seconds=30)]
                text = "".join(e.text for e in events if isinstance(e, TokenDelta))
                assert text == "still here" and isinstance(events[-1], GenerationFinished)
            assert time.monotonic() - started < 10
        finally:
            await router.stop()
    assert silent.started >= 1 and answering.completed == 2
