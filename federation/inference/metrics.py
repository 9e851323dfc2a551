"""The inference node's load as Prometheus series, read at scrape time.

``federation_inference_queue_depth`` over ``federation_inference_queue_capacity`` is
the saturation an alert watches: at capacity, new requests are refused with
RESOURCE_EXHAUSTED (HTTP 429) instead of waiting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federation.inference.types import LoadSnapshot


class InferenceLoadCollector(Collector):
    def __init__(self, load: Callable[[], LoadSnapshot]) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        yield GaugeMetricFamily("federation_inference_running",
                                "Generations running on this node.", value=load.in_flight)
        yield GaugeMetricFamily("federation_inference_queue_depth",
                                "Generations waiting for a model on this node.",
                                value=load.queued)
        yield GaugeMetricFamily("federation_inference_queue_capacity",
                                "Generations that may wait on this node before new ones "
                                "are refused.", value=load.capacity)
