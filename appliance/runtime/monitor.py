"""The partitions as they run: each plan with its worker, the apps placed on it and how busy it is.

A CPU partition's utilisation is its worker's CPU time over the last :data:`UTILISATION_S`, per core
(sampled by :meth:`PartitionMonitor.sample_cpu` on a timer); a GPU's comes from NVML, for the whole
device (a soft slice shares it; NVML reports none per MIG instance).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from appliance.metrics import PartitionSample, cpu_seconds
from appliance.runtime.inventory import NvmlReader
from appliance.runtime.partitions import PartitionPlan
from appliance.runtime.supervisor import WorkerSupervisor
from appliance.status import PartitionStatus

UTILISATION_S = 5.0  # CPU partitions' utilisation is averaged over this many seconds


class PartitionMonitor:
    def __init__(self, plans: list[PartitionPlan], workers: Mapping[str, WorkerSupervisor], nvml: NvmlReader) -> None:
        self._plans = plans
        self._workers = workers
        self._nvml = nvml
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # partition -> (monotonic time, worker CPU seconds)
        self._cpu_percent: dict[str, float] = {}  # partition -> percent of its cores, over the last period

    async def sample_cpu(self) -> None:
        """Read each worker's CPU time; called every :data:`UTILISATION_S`."""
        for plan in self._plans:
            seconds = cpu_seconds(self._workers[plan.name].pid)
            if seconds is None:
                continue
            now = time.monotonic()
            last = self._cpu_seen.get(plan.name)
            self._cpu_seen[plan.name] = (now, seconds)
            if last is not None and now > last[0] and seconds >= last[1]:
                cores = len(plan.cores) or 1
                self._cpu_percent[plan.name] = round(100 * (seconds - last[1]) / (now - last[0]) / cores, 1)

    def _usage(self, plan: PartitionPlan) -> tuple[float | None, str, float | None]:
        """(utilisation percent, what it is of or why there is none, GPU memory in use in MB)."""
        if plan.kind == "cpu" or plan.gpu_index is None:
            return self._cpu_percent.get(plan.name), f"of its cores, over the last {UTILISATION_S:g} s", None
        if plan.kind == "mig":
            return None, "NVML does not report utilisation per MIG instance", None
        usage = self._nvml.usage(plan.gpu_index)
        if usage is None:
            return None, "NVML gave no reading", None
        note = "whole GPU, shared by its slices" if plan.kind == "slice" else "whole GPU"
        return usage.utilisation_percent, note, usage.memory_used_mb

    def status(self, placement: Mapping[str, str]) -> list[PartitionStatus]:
        """Every partition; ``placement`` is app -> partition."""
        out = []
        for plan in self._plans:
            w = self._workers[plan.name]
            expected = plan.expected_provider
            fallback = [k for k, m in w.models.items() if m.state == "failed" and expected in m.reason]
            percent, note, gpu_memory = self._usage(plan)
            out.append(PartitionStatus(
                name=plan.name, device=plan.device, kind=plan.kind, cores=plan.cores, memory_mb=plan.memory_mb,
                compute_percent=plan.compute_percent, provider=expected, env=dict(plan.env), worker=w.state,
                memory_used_mb=round(w.memory_used_mb(), 1),
                apps=tuple(sorted(a for a, p in placement.items() if p == plan.name)),
                utilisation_percent=percent, utilisation_note=note, gpu_memory_used_mb=gpu_memory,
                error=f"fell back from {expected}: {', '.join(fallback)}" if fallback else ""))
        return out

    def samples(self, lane_load: Callable[[str], tuple[int, int]]) -> list[PartitionSample]:
        """What ``/metrics`` shows per partition; ``lane_load`` gives (jobs dispatched, items waiting)."""
        out = []
        for plan in self._plans:
            w = self._workers[plan.name]
            dispatched, queued = lane_load(plan.name)
            gpu = None
            if plan.kind != "cpu":
                percent = self._usage(plan)[0]
                gpu = None if percent is None else int(percent)
            out.append(PartitionSample(plan.name, w.state, w.restarts, w.memory_used_mb(), plan.memory_mb,
                                       dispatched, queued, w.inflight(), w.pid, gpu))
        return out
