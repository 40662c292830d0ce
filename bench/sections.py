"""The benchmark's sections, each a function that measures one thing and returns a JSON-ready dict.

They share a :class:`Context` (the plan of durations, the model, the frames, the working folder) and
the limit measured first, against which every throughput is a ratio. Every load loop has a deadline
and every process started here is stopped in a ``finally``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.giveback import CHECK_S as GIVE_BACK_CHECK_S
from bench.load import LoadClient, LoadRun, Matched
from bench.models import BENCH_MODEL, copy_model
from bench.procs import (
    ROOT,
    Appliance,
    BenchError,
    CpuMeter,
    Mosquitto,
    RssSampler,
    children,
    metric,
    read_proc,
    wait_until,
)

NEVER_RULE = {"name": "never", "labels": ["fire"], "min_score": 2.0}  # softmax scores never reach 2: no events
SERVE_TIMEOUT_S = 120.0  # an app must be serving within this after it is installed


@dataclass(frozen=True)
class Plan:
    """How long each part runs (seconds) and at which loads; ``QUICK`` is for the smoke test."""

    quick: bool
    limit_s: float  # the limit's reference table: each layout and mode, at the start and at the end
    limit_slice_s: float  # the limit measured in each round of the sweep
    streams: tuple[int, ...]
    embedded_streams: tuple[int, ...]  # stream counts also run through the embedded broker
    rounds: int  # each stream count is measured this many times, systems interleaved
    sweep_s: float
    warmup_s: float
    latency_s: float
    latency_load: float  # fraction of capacity for the latency runs
    overload_s: float
    overload_streams: int
    overload_factor: float
    cores_streams: int  # streams for the comparison on fewer cores (the naive target's stream count)
    idle_s: float
    idle_settle_s: float
    swap_streams: int
    swap_before_s: float
    swap_after_s: float
    swap_timeout_s: float  # the swap must be done within this, or the section fails
    model_copies: tuple[int, ...]
    churn_cameras: int  # cameras in each wave of "cameras come and go", each sending one frame
    churn_frame_bytes: int  # bytes per frame in those waves (JPEG)
    churn_forget_s: float  # ingest.source_forget_s of that daemon: the silence between waves lasts this long
    profile_s: float
    tries: int  # a measurement disturbed by other users of the machine is taken again, up to this many times
    quiet_percent: float  # "disturbed": others used more than this much CPU (% of one core) meanwhile
    retry_budget_s: float  # no more retries once the run has taken this long
    cheap_streams: tuple[int, ...]  # stream counts of the cheap model's sweep
    design_streams: tuple[int, ...]  # stream counts at which the worker designs are compared


CHEAP_MODEL = "bench-cheap"  # the second workload: MobileNet v1 0.25 (about 1 ms per inference on one core)
CHEAP_WIDTH = 0.25

FULL = Plan(quick=False, limit_s=6.0, limit_slice_s=3.0, streams=(1, 2, 4, 8, 16, 32), embedded_streams=(1, 8, 32),
            rounds=2, sweep_s=5.0, warmup_s=1.0, latency_s=8.0, latency_load=0.7, overload_s=300.0,
            overload_streams=8, overload_factor=2.0, cores_streams=8, idle_s=60.0, idle_settle_s=5.0, swap_streams=4,
            swap_before_s=5.0, swap_after_s=5.0, swap_timeout_s=120.0, model_copies=(1, 2, 4), churn_cameras=150,
            churn_frame_bytes=2_000_000, churn_forget_s=10.0, profile_s=20.0, tries=3, quiet_percent=10.0,
            retry_budget_s=600.0, cheap_streams=(1, 2, 4, 8, 16), design_streams=(1, 2, 8))
QUICK = Plan(quick=True, limit_s=0.3, limit_slice_s=0.3, streams=(1, 2), embedded_streams=(1,), rounds=1,
             sweep_s=0.6, warmup_s=0.2, latency_s=0.6, latency_load=0.7, overload_s=1.5, overload_streams=2,
             overload_factor=2.0, cores_streams=2, idle_s=1.0, idle_settle_s=0.2, swap_streams=2, swap_before_s=0.3,
             swap_after_s=0.3, swap_timeout_s=60.0, model_copies=(1, 2), churn_cameras=6, churn_frame_bytes=100_000,
             churn_forget_s=1.0, profile_s=2.0, tries=1, quiet_percent=10.0, retry_budget_s=0.0,
             cheap_streams=(1,), design_streams=(1,))


@dataclass
class Context:
    plan: Plan
    model_dir: Path
    frames: list[bytes]
    workdir: Path
    threads: int  # intra-op threads of the appliance's worker and the naive baseline (one per core)
    out_dir: Path  # where plots and profiles go

    @property
    def model(self) -> str:
        """The name of the model the systems run (the bench model, or the cheap one)."""
        name: str = json.loads((self.model_dir / "model.json").read_text(encoding="utf-8"))["name"]
        return name


# --- helpers -------------------------------------------------------------------------------------


def pct(values: list[float] | np.ndarray[Any, Any], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def _histogram_mean(text: str, name: str, **labels: str) -> tuple[float, float]:
    return metric(text, f"{name}_sum", **labels), metric(text, f"{name}_count", **labels)


class WorkerTimes:
    """Mean decode and inference time in the worker over a run, from the /metrics histograms."""

    def __init__(self, daemon: Appliance, model_key: str) -> None:
        self._daemon, self._key = daemon, model_key
        self._before = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        text = self._daemon.metrics()
        d = _histogram_mean(text, "appliance_decode_seconds")
        i = _histogram_mean(text, "appliance_inference_seconds", model=self._key)
        return d[0], d[1], i[0], i[1]

    def result(self) -> dict[str, float | None]:
        after = self._read()
        ds, dn, is_, in_ = (a - b for a, b in zip(after, self._before))
        return {"decode_ms": round(ds / dn * 1000, 3) if dn else None,
                "infer_ms": round(is_ / in_ * 1000, 3) if in_ else None}


def make_app(path: Path, name: str, model: str, version: str, sources: list[str], model_version: str = "1.0.0") -> Path:
    path.write_text(json.dumps({"schema": 1, "name": name, "version": version,
                                "model": {"name": model, "version": model_version}, "sources": sources,
                                "rules": [NEVER_RULE]}))
    return path


def model_key(version: str = "1.0.0", name: str = BENCH_MODEL) -> str:
    return f"{name}@{version}"


def worker_layout() -> tuple[int, int]:
    """(executors, intra-op threads per session) of the worker the appliance runs on this machine's CPU
    partition with its default settings, from the appliance's own planner."""
    from appliance.runtime.inventory import read_inventory
    from appliance.runtime.partitions import plan_partitions

    cpu = [p for p in plan_partitions("auto", read_inventory(), Path("tensorrt-cache")) if p.kind == "cpu"][-1]
    return cpu.executors, cpu.threads_for(cpu.executors)


def limit_layouts(cores: int, executors: int, intra_op: int) -> list[tuple[int, int, int]]:
    """(processes, threads, loops) of the limit's layouts on ``cores`` cores: for 1, 2, 4, ... frames in flight up to
    one per core, one process with that many loops sharing a session with the cores shared out among them
    (one loop with a thread per core: the best for a lone frame); one process per core, one thread each; and
    the worker's own layout (a loop per executor)."""
    layouts = [(1, max(1, cores // c), c) for c in sorted({*(2**i for i in range(8) if 2**i < cores), cores})]
    if cores > 1:
        layouts.append((cores, 1, 1))
    if (1, intra_op, executors) not in layouts:
        layouts.append((1, intra_op, executors))
    return layouts


def worker_designs(cores: int) -> list[tuple[str, str, str]]:
    """(key, label, [runtime] settings) of the CPU worker's possible layouts, compared side by side."""
    runtime = "[runtime]\n"
    return [
        ("default", f"{cores} one-thread sessions, and a {cores}-thread session for a frame alone (the default)", ""),
        ("narrow", f"{cores} one-thread sessions only", runtime + "lone_frame_all_cores = false\n"),
        ("pool", f"{cores} executors sharing one session of {cores} threads (not spinning)",
         runtime + f"intra_op_threads = {cores}\nlone_frame_all_cores = false\n"),
        ("wide", f"1 executor, one session of {cores} threads", runtime + "executors = 1\n"),
    ]


def install_bench_app(ctx: Context, daemon: Appliance, prefix: str = "cameras") -> None:
    """The bench app on ``{prefix}/+/frame``: daemons that share a broker listen on prefixes of their own."""
    daemon.cli("models", "add", str(ctx.model_dir))
    daemon.cli("apps", "add", str(make_app(ctx.workdir / f"app-{daemon.http_port}.json", "bench", ctx.model,
                                           "1.0.0", [f"{prefix}/+/frame"])))


# --- conditions ----------------------------------------------------------------------------------


def conditions(ctx: Context) -> dict[str, Any]:
    executors, intra_op = worker_layout()
    import onnxruntime

    from appliance import __version__
    from formats.model_card import ModelCard

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10, check=False).stdout
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT,
                         timeout=10, check=False).stdout.strip()
    card = ModelCard.load(ctx.model_dir / "model.json")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": ctx.plan.quick,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "mosquitto": mosquitto.splitlines()[0] if mosquitto else "unknown",
        "appliance": __version__,
        "git": git,
        "model": {"name": card.name, "description": card.description, "input": f"{card.input.name} 1x3x224x224 "
                  "float32 (letterboxed, ImageNet mean/std)", "file_mb": round(
                      (ctx.model_dir / "model.onnx").stat().st_size / 1e6, 2)},
        "frames": {"count": len(ctx.frames), "size": "640x480 JPEG quality 80 (appliance.demo.scene.render_frame)",
                   "mean_bytes": int(np.mean([len(f) for f in ctx.frames]))},
        "threads": {"appliance_executors": executors, "appliance_intra_op": intra_op, "naive": ctx.threads,
                    "inter_op": 1, "execution_mode": "sequential"},
    }


# --- the naive baseline ---------------------------------------------------------------------------


@contextmanager
def naive_process(ctx: Context, port: int, mqtt5: bool, prefix: str) -> Iterator[subprocess.Popen[str]]:
    """The naive baseline as a subprocess, listening on ``{prefix}/+/frame``; stopped on the way out."""
    args = [sys.executable, "-m", "bench.naive", "--port", str(port), "--model", str(ctx.model_dir),
            "--threads", str(ctx.threads), "--prefix", prefix] + (["--mqtt5"] if mqtt5 else [])
    log = open(ctx.workdir / "naive.log", "a")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        ready = threading.Event()

        def wait_ready() -> None:
            if proc.stdout is not None and proc.stdout.readline().strip() == "ready":
                ready.set()

        threading.Thread(target=wait_ready, daemon=True).start()
        if not ready.wait(60):
            raise BenchError(f"the naive baseline did not start: {(ctx.workdir / 'naive.log').read_text()[-2000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


# --- 4. overload ---------------------------------------------------------------------------------


def _slope_mb_per_min(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope (MB/min) and the fitted change over the samples (MB)."""
    if len(samples) < 3:
        return 0.0, 0.0
    t = np.array([s[0] for s in samples])
    y = np.array([s[1] for s in samples])
    slope = float(np.polyfit(t - t[0], y, 1)[0])
    return slope * 60, slope * float(t[-1] - t[0])


def overload(ctx: Context, client: LoadClient, daemon: Appliance, broker_pid: int | None, capacity: float,
             closed_loop_p99_ms: float | None) -> dict[str, Any]:
    plan = ctx.plan
    offered = capacity * plan.overload_factor
    workers = daemon.worker_pids()

    def pids() -> dict[str, int]:
        out = {"daemon": daemon.pid or 0, **workers}
        if broker_pid:
            out["mosquitto"] = broker_pid
        return out

    before = {s["id"]: s for s in daemon.status()["sources"]}
    row: dict[str, Any] = {"streams": plan.overload_streams, "offered_fps": round(offered, 2),
                           "capacity_fps": round(capacity, 2)}
    with RssSampler(pids, 1.0) as sampler, CpuMeter(dict(pids())) as meter:
        run = client.open_loop(plan.overload_streams, offered, plan.overload_s, plan.warmup_s)
    row.update(meter.result())
    after = {s["id"]: s for s in daemon.status()["sources"]}
    per_stream = run.per_stream_fps()
    got = run.in_window()
    ages = [m.latency for m in got]
    t0 = sampler.samples[0][0] if sampler.samples else 0.0
    series: dict[str, list[tuple[float, float]]] = {}
    for t, readings in sampler.samples:
        for role, r in readings.items():
            series.setdefault(role, []).append((round(t - t0, 2), round(r.rss_mb, 2)))
    memory = {}
    for role, points in series.items():
        steady = [p for p in points if p[0] >= max(plan.warmup_s, 0.1 * (points[-1][0] if points else 0))]
        slope, drift = _slope_mb_per_min(steady)
        memory[role] = {"start_mb": points[0][1], "end_mb": points[-1][1], "max_mb": max(p[1] for p in points),
                        "slope_mb_per_min": round(slope, 3), "drift_mb": round(drift, 2)}
    skipped = sum(after[s]["skipped"] - before.get(s, {}).get("skipped", 0) for s in after if s.startswith("s"))
    received = sum(after[s]["received"] - before.get(s, {}).get("received", 0) for s in after if s.startswith("s"))
    lo, hi = min(per_stream.values()), max(per_stream.values())
    row.update({
        "seconds": round(run.seconds, 1),
        "fps": round(run.throughput(), 2),
        "per_stream_fps": {k: round(v, 2) for k, v in sorted(per_stream.items(), key=lambda kv: int(kv[0][1:]))},
        "fairness": round(hi / lo, 3) if lo > 0 else None,
        "frame_age_ms": {"p50": ms(pct(ages, 50)), "p99": ms(pct(ages, 99)), "max": ms(max(ages) if ages else None)},
        "closed_loop_p99_ms": closed_loop_p99_ms,
        "skipped_fraction": round(skipped / received, 3) if received else None,
        "memory": memory,
        "rss_series": series,
    })
    return row


# --- 5. idle footprint ---------------------------------------------------------------------------


def _footprint(samples: list[tuple[float, dict[str, Any]]], elapsed: float) -> dict[str, Any]:
    roles = sorted({role for _, readings in samples for role in readings})
    out: dict[str, Any] = {"processes": {}}
    for role in roles:
        readings = [r[role] for _, r in samples if role in r]
        cpu = (readings[-1].cpu_s - readings[0].cpu_s) / elapsed * 100 if len(readings) > 1 and elapsed else 0.0
        pss = [x.pss_mb for x in readings if x.pss_mb is not None]
        out["processes"][role] = {"name": readings[0].name, "rss_mb": round(float(np.mean([x.rss_mb for x in readings])), 1),
                                  "pss_mb": round(float(np.mean(pss)), 1) if pss else None,
                                  "cpu_percent": round(cpu, 3)}
    procs = out["processes"].values()
    out["rss_mb"] = round(sum(p["rss_mb"] for p in procs), 1)
    out["pss_mb"] = round(sum(p["pss_mb"] or 0 for p in procs), 1)
    out["cpu_percent"] = round(sum(p["cpu_percent"] for p in procs), 3)
    return out


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = ""
    if "resource_tracker" in cmdline:
        return "resource tracker"
    r = read_proc(pid)
    return f"{r.name if r else 'process'} {pid}"


def idle(ctx: Context, with_mosquitto: bool) -> dict[str, Any]:
    plan = ctx.plan
    broker = Mosquitto(ctx.workdir) if with_mosquitto else None
    try:
        if broker is not None:
            broker.start()
        with Appliance(ctx.workdir, broker_port=broker.port if broker else None, results=False) as daemon:
            daemon.start()
            time.sleep(plan.idle_settle_s)
            pid = daemon.pid or 0

            def pids() -> dict[str, int]:
                out = {"daemon": pid}
                workers = {p: role for role, p in daemon.worker_pids().items()}
                for child in children(pid):
                    out[workers.get(child) or _describe(child)] = child
                if broker is not None and broker.pid:
                    out["mosquitto"] = broker.pid
                return out

            t0 = time.monotonic()
            with RssSampler(pids, 1.0) as sampler:
                time.sleep(plan.idle_s)
            elapsed = sampler.samples[-1][0] - sampler.samples[0][0] if len(sampler.samples) > 1 else time.monotonic() - t0
            result = _footprint(sampler.samples, elapsed)
            result["seconds"] = round(elapsed, 1)
            result["broker"] = "mosquitto" if broker else "embedded"
            mgmt = {k: v for k, v in result["processes"].items() if k != "mosquitto"}
            result["appliance_rss_mb"] = round(sum(p["rss_mb"] for p in mgmt.values()), 1)
            result["appliance_cpu_percent"] = round(sum(p["cpu_percent"] for p in mgmt.values()), 3)
            return result
    finally:
        if broker is not None:
            broker.stop()


# --- 6. hot swap ---------------------------------------------------------------------------------


def hot_swap(ctx: Context, client: LoadClient, daemon: Appliance, capacity: float, work_s: float) -> dict[str, Any]:
    plan = ctx.plan
    v2 = copy_model(ctx.model_dir, ctx.workdir / f"{BENCH_MODEL}-v2", version="2.0.0")
    daemon.cli("models", "add", str(v2))
    app_v2 = make_app(ctx.workdir / "app-v2.json", "bench", BENCH_MODEL, "2.0.0", ["cameras/+/frame"], "2.0.0")
    rate = capacity * plan.latency_load
    seconds = plan.swap_before_s + plan.swap_timeout_s + plan.swap_after_s  # the most it runs; stopped after the swap
    box: dict[str, Any] = {}
    stop = threading.Event()

    def drive() -> None:
        try:
            box["run"] = client.open_loop(plan.swap_streams, rate, seconds, 0.0, stop=stop, even=True)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e

    before = {s["id"]: s for s in daemon.status()["sources"]}
    driver = threading.Thread(target=drive, name="swap-load")
    driver.start()
    try:
        time.sleep(plan.swap_before_s)
        t_cmd = time.time()
        daemon.cli("apps", "add", str(app_v2))
        t_installed = time.time()

        def swapped() -> bool:
            app = daemon.app_state("bench")
            return bool(app and app["model"] == model_key("2.0.0"))

        wait_until(swapped, plan.swap_timeout_s, "the app to run v2")
        t_swapped = time.time()
        wait_until(lambda: not any(m["key"] == model_key("1.0.0") for m in daemon.status()["models"]),
                   plan.swap_timeout_s, "v1 to be unloaded")
        t_unloaded = time.time()
        note = (daemon.app_state("bench") or {}).get("swap", "")
        time.sleep(plan.swap_after_s)
    finally:
        stop.set()
        driver.join(seconds + 60)
    if "error" in box:
        raise BenchError(f"the load during the swap failed: {box['error']}")
    if driver.is_alive() or "run" not in box:
        raise BenchError("the load during the swap did not finish")
    run: LoadRun = box["run"]
    after = {s["id"]: s for s in daemon.status()["sources"]}
    delta = {k: sum(after[s][k] - before.get(s, {}).get(k, 0) for s in after if s.startswith("s"))
             for k in ("received", "processed", "skipped")}
    rejected = sum(sum(after[s]["rejected"].values()) - sum(before.get(s, {}).get("rejected", {}).values())
                   for s in after if s.startswith("s"))
    sent = sum(len(v) for v in run.sent.values())
    results = len(run.matched)
    swap_end = t_unloaded + 1.0  # results of frames sent until v1 was unloaded come up to a second later
    during = [m for m in run.matched if t_cmd <= m.sent <= swap_end]
    outside = [m for m in run.matched if m.sent < t_cmd or m.sent > swap_end]
    first, last = run.window[0], max(t for times in run.sent.values() for t in times) + 1e-6
    lost_during = run.unanswered(t_cmd, swap_end)
    return {
        "streams": plan.swap_streams, "offered_fps": round(rate, 2), "seconds": round(run.seconds, 1),
        "sent": sent, "results": results, "lost": sent - results, "lost_during_swap": lost_during,
        "lost_outside_swap": run.unanswered(first, t_cmd) + run.unanswered(swap_end, last),
        "swap_window_s": round(swap_end - t_cmd, 2),
        "daemon": {**delta, "rejected": rejected},
        "swap_s": round(t_swapped - t_cmd, 3), "cli_s": round(t_installed - t_cmd, 3),
        "unload_s": round(t_unloaded - t_cmd, 3), "note": note,
        "latency_during_ms": {"p50": ms(pct([m.latency for m in during], 50)),
                              "p99": ms(pct([m.latency for m in during], 99)),
                              "max": ms(max((m.latency for m in during), default=0.0))},
        "latency_outside_ms": {"p50": ms(pct([m.latency for m in outside], 50)),
                               "p99": ms(pct([m.latency for m in outside], 99))},
        "max_result_gap_ms": _max_gap(run.matched, t_cmd, swap_end),
        "frame_interval_ms": round(plan.swap_streams / rate * 1000, 1),
        "work_ms": round(work_s * 1000, 3),
    }


def _max_gap(matched: list[Matched], start: float, end: float) -> float | None:
    """The longest time between two results of the same stream, over results received in [start, end]."""
    by_source: dict[str, list[float]] = {}
    for m in matched:
        by_source.setdefault(m.source, []).append(m.received)
    gap = 0.0
    for times in by_source.values():
        times.sort()
        for a, b in itertools.pairwise(times):
            if b >= start and a <= end:
                gap = max(gap, b - a)
    return ms(gap)


# --- 7. memory per extra model -------------------------------------------------------------------


def memory_per_model(ctx: Context, broker_port: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    settle = 0.3 if ctx.plan.quick else 2.0  # seconds after a change before reading memory
    with Appliance(ctx.workdir, broker_port=broker_port, results=False) as daemon:
        daemon.start()
        time.sleep(settle)

        def step(models: int) -> dict[str, Any]:
            pid = next(iter(daemon.worker_pids().values()))
            r = read_proc(pid)
            if r is None:
                raise BenchError("the worker is gone")
            return {"models": models, "rss_mb": round(r.rss_mb, 1),
                    "pss_mb": round(r.pss_mb, 1) if r.pss_mb is not None else None,
                    "reported_mb": [m["memory_mb"] for m in daemon.status()["models"]]}

        steps.append(step(0))
        installed = 0
        for count in ctx.plan.model_copies:
            while installed < count:
                name = f"{BENCH_MODEL}-c{installed}"
                copy = copy_model(ctx.model_dir, ctx.workdir / f"{name}-{daemon.http_port}", name=name)
                daemon.cli("models", "add", str(copy))
                daemon.cli("apps", "add", str(make_app(ctx.workdir / f"{name}-{daemon.http_port}.json",
                                                       f"app-c{installed}", name, "1.0.0",
                                                       [f"cameras/c{installed}/frame"])))
                installed += 1
            apps = [f"app-c{i}" for i in range(count)]
            wait_until(lambda apps=apps: daemon.serving(*apps), SERVE_TIMEOUT_S, f"{count} apps serving")  # type: ignore[misc]
            time.sleep(settle)
            steps.append(step(count))
    base, one, last = steps[0], steps[1], steps[-1]
    extra: float | None = None
    if last["models"] > one["models"]:
        extra = (float(last["rss_mb"]) - float(one["rss_mb"])) / (last["models"] - one["models"])
    return {"steps": steps, "first_model_mb": round(float(one["rss_mb"]) - float(base["rss_mb"]), 1),
            "per_extra_model_mb": round(extra, 1) if extra is not None else None,
            "reported_mean_mb": round(float(np.mean(last["reported_mb"])), 1) if last["reported_mb"] else None}


# --- 9. memory as cameras come and go -----------------------------------------------------------


CHURN_BATCH = 10  # cameras published at once, then served, before the next ones: as cameras do, not a burst


def big_frame(size: int, seed: int = 0) -> bytes:
    """A JPEG of about ``size`` bytes (noise compresses little: about 0.9 bytes per pixel at quality 90)."""
    import io

    from PIL import Image

    pixels = size / 0.9
    width = max(16, int((pixels * 4 / 3) ** 0.5))
    height = max(16, int(width * 3 / 4))
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "JPEG", quality=90)
    return out.getvalue()


def source_churn(ctx: Context, broker_port: int) -> dict[str, Any]:
    """Daemon RSS while two waves of new cameras (one big frame each) come and go, with silence between them
    as long as ``ingest.source_forget_s``: what is kept per source is bounded, so the second wave must not
    add to the first."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    plan = ctx.plan
    frame = big_frame(plan.churn_frame_bytes)
    settle = 0.3 if plan.quick else 2.0  # seconds after a step before reading memory
    forget = plan.churn_forget_s
    extra = f"""
        [ingest]
        source_silent_s = {forget / 2:g}
        source_forget_s = {forget:g}
        """
    steps: list[dict[str, Any]] = []
    with Appliance(ctx.workdir, broker_port=broker_port, results=False, extra=extra) as daemon:
        install_bench_app(ctx, daemon)
        daemon.start()
        wait_until(lambda: daemon.serving("bench"), SERVE_TIMEOUT_S, "the bench app serving")
        pid = daemon.pid or 0

        def step(name: str) -> None:
            time.sleep(settle)
            rss = [r.rss_mb for r in (read_proc(pid) for _ in range(3)) if r is not None]
            if not rss:
                raise BenchError("the daemon is gone")
            text = daemon.metrics()
            steps.append({"step": name, "rss_mb": round(float(np.median(rss)), 1),
                          "frames_mb": round(metric(text, "appliance_latest_frames_bytes") / 2**20, 1),
                          "sources": int(metric(text, "appliance_sources_tracked"))})

        def served(prefix: str) -> int:
            return sum(1 for s in daemon.status()["sources"] if s["id"].startswith(prefix)
                       and s["processed"] + s["skipped"] + sum(s["rejected"].values()) >= s["received"] >= 1)

        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", broker_port)
        client.loop_start()
        peak = 0.0
        try:
            step("before")
            for wave in ("a", "b"):
                prefix = f"churn{wave}"
                for start in range(0, plan.churn_cameras, CHURN_BATCH):
                    batch = range(start, min(start + CHURN_BATCH, plan.churn_cameras))
                    for i in batch:
                        client.publish(f"cameras/{prefix}{i}/frame", frame, qos=1).wait_for_publish(30)
                    wait_until(lambda p=prefix, n=batch.stop: served(p) >= n, 120,  # type: ignore[misc]
                               f"wave {wave}: {batch.stop} cameras served")
                    r = read_proc(pid)
                    peak = max(peak, r.rss_mb if r else 0.0)
                step(f"wave {wave}")
                wait_until(lambda: metric(daemon.metrics(), "appliance_sources_tracked") == 0, forget * 3 + 30,
                           f"wave {wave} forgotten", interval=0.25)
                if not plan.quick:  # the daemon gives freed memory back on its next look (appliance.giveback)
                    time.sleep(GIVE_BACK_CHECK_S)
                step(f"silence after wave {wave}")
        finally:
            client.loop_stop()
            client.disconnect()
    at = {s["step"]: s["rss_mb"] for s in steps}
    from appliance.settings import IngestSettings

    return {"cameras": plan.churn_cameras, "frame_bytes": len(frame), "forget_s": forget, "batch": CHURN_BATCH,
            "budget_mb": round(IngestSettings().latest_frames_bytes / 2**20, 1), "received_mb": round(2 * plan.churn_cameras * len(frame) / 2**20, 1),
            "steps": steps, "peak_rss_mb": round(peak, 1),
            "second_x_first": round(at["wave b"] / at["wave a"], 3),
            "end_x_before": round(at["silence after wave b"] / at["before"], 3)}


# --- profile (optional) --------------------------------------------------------------------------


def profile(ctx: Context, client: LoadClient, daemon: Appliance, streams: int, name: str = "") -> dict[str, Any]:
    """py-spy on the daemon's main process and its worker under a closed-loop load; top functions by own time.
    The raw stacks go to ``profile-{name}{role}.txt``."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    targets = {"main": daemon.pid or 0, **daemon.worker_pids()}
    procs = {}
    files = {}
    for role, pid in targets.items():
        files[role] = ctx.out_dir / f"profile-{name}{role}.txt"
        procs[role] = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(ctx.plan.profile_s)),
                                        "--rate", "100", "--format", "raw", "--nonblocking", "-o", str(files[role])],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = client.closed_loop(streams, ctx.plan.profile_s + 2, 0.5)
    finally:
        for p in procs.values():
            try:
                p.wait(ctx.plan.profile_s + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    out: dict[str, Any] = {"streams": streams, "fps": round(run.throughput(), 2)}
    for role, path in files.items():
        out[role] = _top_functions(path) if path.exists() else {"error": "py-spy wrote nothing"}
    return out


def _top_functions(path: Path, n: int = 12) -> dict[str, Any]:
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        samples += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            total[f] = total.get(f, 0) + count

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(v / samples * 100, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": samples, "own_percent": top(own), "inclusive_percent": top(total), "raw": path.name}
