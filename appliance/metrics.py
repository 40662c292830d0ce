"""Prometheus metrics on a registry of the daemon's own (``/metrics``).

Per-source counters are read from :class:`~appliance.stats.Stats` at scrape time, so there is one
record of them; latency histograms are observed as results come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.stats import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, workers: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._stats = stats
        self._workers = workers

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        received = CounterMetricFamily("appliance_frames_received", "Messages received per source", labels=["source", "kind"])
        processed = CounterMetricFamily("appliance_frames_processed", "Messages served by a model", labels=["source", "kind"])
        skipped = CounterMetricFamily(
            "appliance_frames_skipped", "Messages replaced by a newer one before they were served (overload)",
            labels=["source", "kind"])
        rejected = CounterMetricFamily(
            "appliance_frames_rejected", "Messages refused, by reason", labels=["source", "kind", "reason"])
        for sid, kind, rx, px, sx, rej in self._stats.counts():
            received.add_metric([sid, kind], rx)
            processed.add_metric([sid, kind], px)
            skipped.add_metric([sid, kind], sx)
            for reason, n in rej.items():
                rejected.add_metric([sid, kind, reason], n)
        totals, _ = self._stats.unknown_snapshot()
        for reason, n in totals.items():
            rejected.add_metric(["(unknown)", "", reason], n)
        events = CounterMetricFamily("appliance_events", "Events raised per app", labels=["app"])
        for app, n in self._stats.events_snapshot().items():
            events.add_metric([app], n)
        restarts = CounterMetricFamily("appliance_worker_restarts", "Worker process restarts", labels=["partition"])
        up = GaugeMetricFamily("appliance_worker_up", "1 when the partition's worker is serving", labels=["partition"])
        for partition, state, n in self._workers():
            restarts.add_metric([partition], n)
            up.add_metric([partition], 1.0 if state == "ready" else 0.0)
        yield from (received, processed, skipped, rejected, events, restarts, up)


class Metrics:
    def __init__(self, stats: Stats, workers: Callable[[], list[tuple[str, str, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, workers))
        self.inference = Histogram(
            "appliance_inference_seconds", "Preprocess + inference + output decoding per model, in the worker",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode = Histogram(
            "appliance_decode_seconds", "Image decoding in the worker", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.pipeline = Histogram(
            "appliance_pipeline_seconds", "Arrival of a message to its result (queueing + decode + inference)",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
