"""Prometheus metrics on a registry of the daemon's own (``/metrics``).

Per-source counters are read from :class:`~appliance.stats.Stats` at scrape time, so there is one
record of them; latency histograms are observed as results come back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.sidework import SideWork
from appliance.stats import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


@dataclass(frozen=True, slots=True)
class PartitionSample:
    name: str
    worker_state: str
    restarts: int
    memory_used_mb: float  # measured at model load, summed over the models loaded
    memory_limit_mb: int | None
    dispatched: int  # jobs handed to the worker
    queued: int  # items waiting in the partition's latest-wins slots
    inflight: int  # jobs the worker holds
    pid: int | None = None
    gpu_utilisation_percent: int | None = None  # of the whole GPU the partition is on; None under MIG or on CPU


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) of process ``pid`` so far, from /proc; None if it cannot be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, partitions: Callable[[], list[PartitionSample]]) -> None:
        self._stats = stats
        self._partitions = partitions

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
        for reason, n in self._stats.unknown().rejected.items():
            rejected.add_metric(["(unknown)", "", reason], n)
        events = CounterMetricFamily("appliance_events", "Events raised per app", labels=["app"])
        for app, n in self._stats.event_counts().items():
            events.add_metric([app], n)
        tracked = GaugeMetricFamily("appliance_sources_tracked", "Sources remembered (forgotten after ingest."
                                    "source_forget_s of silence)", value=self._stats.tracked())
        frames = GaugeMetricFamily("appliance_latest_frames_bytes", "Bytes held in the cameras' latest frames for "
                                   "the console (at most ingest.latest_frames_bytes)", value=self._stats.frame_bytes())
        p = ["partition"]
        restarts = CounterMetricFamily("appliance_worker_restarts", "Worker process restarts", labels=p)
        up = GaugeMetricFamily("appliance_worker_up", "1 when the partition's worker is serving", labels=p)
        used = GaugeMetricFamily("appliance_partition_memory_used_bytes", "Memory the loaded models took", labels=p)
        limit = GaugeMetricFamily("appliance_partition_memory_limit_bytes", "The partition's memory budget", labels=p)
        jobs = CounterMetricFamily("appliance_partition_inferences", "Jobs handed to the partition's worker", labels=p)
        queued = GaugeMetricFamily("appliance_partition_queue_depth", "Items waiting in the partition's slots", labels=p)
        inflight = GaugeMetricFamily("appliance_partition_inflight", "Jobs the worker holds", labels=p)
        cpu = CounterMetricFamily("appliance_partition_cpu_seconds", "CPU time of the partition's worker process "
                                  "(rate / cores = utilisation of a CPU partition)", labels=p)
        gpu = GaugeMetricFamily("appliance_partition_gpu_utilisation_percent", "NVML utilisation of the whole GPU "
                                "the partition is on (absent under MIG: NVML does not report it per instance)", labels=p)
        for s in self._partitions():
            restarts.add_metric([s.name], s.restarts)
            up.add_metric([s.name], 1.0 if s.worker_state == "ready" else 0.0)
            used.add_metric([s.name], s.memory_used_mb * 1024 * 1024)
            if s.memory_limit_mb is not None:
                limit.add_metric([s.name], s.memory_limit_mb * 1024 * 1024)
            jobs.add_metric([s.name], s.dispatched)
            queued.add_metric([s.name], s.queued)
            inflight.add_metric([s.name], s.inflight)
            seconds = cpu_seconds(s.pid)
            if seconds is not None:
                cpu.add_metric([s.name], seconds)
            if s.gpu_utilisation_percent is not None:
                gpu.add_metric([s.name], s.gpu_utilisation_percent)
        yield from (received, processed, skipped, rejected, events, tracked, frames, restarts, up, used, limit, jobs, queued,
                    inflight, cpu, gpu)


class Metrics:
    def __init__(self, stats: Stats, partitions: Callable[[], list[PartitionSample]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, partitions))
        self.inference = Histogram(
            "appliance_inference_seconds", "Inference + output decoding per model run (a batch's wall time), in the worker",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode = Histogram(
            "appliance_decode_seconds", "Image decoding in the worker", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram(
            "appliance_batch_size", "Per frame: how many frames ran with it in one model run", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.alone = Counter(
            "appliance_frames_alone", "Frames that had a CPU worker to themselves and ran on every core of its "
            "partition (runtime.lone_frame_all_cores)", registry=self.registry)
        self.frame_age = Histogram(
            "appliance_frame_age_seconds", "Capture time (MQTT 5 'ts' or telemetry ts, else arrival) to result",
            ["kind"], buckets=LATENCY_BUCKETS + (30.0, 60.0), registry=self.registry)
        self.pipeline = Histogram(
            "appliance_pipeline_seconds", "Arrival of a message to its result (queueing + decode + inference)",
            ["kind"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.side_work = SideWork(Counter(
            "appliance_side_work_errors", "Failures of the work done beside the rules for each result or event "
            "(samples, results, events-mqtt, live); the rules and events go on regardless", ["work"],
            registry=self.registry))

    def render(self) -> bytes:
        return generate_latest(self.registry)
