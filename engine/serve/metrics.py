"""Prometheus metrics of one app (its own registry, so several apps can live in one process: tests).

    bssan_request_seconds{route, method, status}   histogram of request latency
    bssan_queue_depth{queue}                        requests waiting for a micro-batch (text, image)
    bssan_batch_size                                histogram of requests per scorer call
    bssan_pairs_scored_total                        BSSAN pairs re-ranked (rate() of it: pairs/s)
    bssan_pairs_per_second                          pairs/s of the scoring calls so far (pairs / seconds in score_pairs)
    bssan_gallery_images                            images in the gallery
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0, 5.0, 10.0)


class _PairsCollector:
    def __init__(self):
        self.service = None

    def collect(self):
        pairs = self.service.pairs_scored if self.service is not None else 0
        yield CounterMetricFamily("bssan_pairs_scored", "BSSAN pairs re-ranked", value=pairs)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("bssan_request_seconds", "Request latency", ["route", "method", "status"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("bssan_batch_size", "Requests per scorer call", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.queue_depth = Gauge("bssan_queue_depth", "Requests waiting for a micro-batch", ["queue"], registry=self.registry)
        self.pairs_per_second = Gauge("bssan_pairs_per_second", "Pairs per second inside score_pairs so far", registry=self.registry)
        self.gallery = Gauge("bssan_gallery_images", "Images in the gallery", registry=self.registry)
        self.pairs = _PairsCollector()
        self.registry.register(self.pairs)

    def attach(self, state) -> None:
        """Point the callback gauges at a loaded ServiceState."""
        service = state.service
        self.pairs.service = service
        self.gallery.set_function(lambda: len(state.gallery))
        self.pairs_per_second.set_function(lambda: service.pairs_scored / service.scoring_seconds if service.scoring_seconds else 0.0)
        for name in ("text", "image"):
            self.queue_depth.labels(name).set_function(
                lambda name=name: getattr(getattr(state, f"{name}_batcher", None), "waiting", 0))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.latency.labels(route, method, str(status)).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
