"""The limit: the same work as the appliance's worker, done by raw ONNX Runtime in tight loops.

Each loop decodes a pre-encoded JPEG, preprocesses it and runs the model (``mode="pipeline"``), or only
runs the model on a preprocessed tensor (``mode="infer"``), with the decode and preprocess functions and
session options the worker uses (``appliance.runtime.worker``): ``intra_op_num_threads`` threads,
one inter-op thread, sequential execution. A *layout* is ``processes`` spawned processes, each with
``loops`` threads running the loop on one shared session with ``threads`` intra-op threads; with one
process per core and one thread each, each process is pinned to its own core. One process with a loop
per core, sharing one session with one intra-op thread (no pool: each loop runs the model on its own
thread), is the appliance worker's layout on a CPU partition (its executor threads).

A :class:`LimitPool` keeps a layout's processes and sessions alive, so that the limit can be measured
again and again between the runs of the systems under test (the machine is shared: only measurements
taken close together in time compare well). All processes of a layout start each loop together::

    with LimitPool(model_dir, frames, processes=2, threads=1) as pool:
        layout = pool.run(seconds=5, mode="pipeline")
        print(layout.fps, layout.stage_ms)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal, Self

from appliance.runtime.worker import session_options
from bench.procs import BenchError

__all__ = ["LayoutResult", "LimitPool", "session_options"]

Mode = Literal["pipeline", "infer"]
WARMUP_RUNS = 5
LOAD_TIMEOUT_S = 120.0  # every process must load its session and say so within this
REPORT_GRACE_S = 30.0  # after a run's seconds, how long its reports may take
MAX_SAMPLES = 20_000  # per-iteration times kept per process and run


@dataclass
class LayoutResult:
    name: str
    mode: str
    processes: int
    threads: int
    loops: int
    seconds: float
    frames: int
    fps: float
    per_frame_ms: dict[str, float]  # one iteration: p50, p90, p99, mean (wall time in one process)
    stage_ms: dict[str, float]  # medians of decode, preprocess, infer (pipeline mode)
    session_mb: float  # resident memory added by creating and warming up one session
    load_s: float  # creating the session and warming it up
    per_process_fps: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def layout_name(processes: int, threads: int, loops: int = 1) -> str:
    name = f"{processes} process{'es' if processes > 1 else ''}"
    if loops > 1:
        name += f" x {loops} loops"
    return f"{name} x {threads} thread{'s' if threads > 1 else ''}"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    arr = np.asarray(values) * 1000
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


class _Work:
    """What one process of a layout has loaded: the session, the frames and the preprocessed tensors."""

    def __init__(self, model_dir: str, frames: list[bytes], threads: int, loops: int) -> None:
        import numpy as np
        import onnxruntime as ort

        from appliance.runtime.processing import decode_frame, preprocess_image
        from formats.model_card import ImageInput, ModelCard

        self.card = card = ModelCard.load(Path(model_dir) / "model.json")
        spec = card.input
        if not isinstance(spec, ImageInput):
            raise TypeError("the benchmark model takes images")
        self.spec, self.frames, self.names = spec, frames, card.output_names()
        before = _rss_mb()
        t0 = time.perf_counter()
        data = (Path(model_dir) / "model.onnx").read_bytes()
        self.session = ort.InferenceSession(data, sess_options=session_options(threads, spinning=loops == 1),
                                            providers=["CPUExecutionProvider"])
        self.session.run(self.names, {spec.name: np.zeros((1, 3, spec.height, spec.width), np.float32)})
        self.load_s = time.perf_counter() - t0
        self.session_mb = _rss_mb() - before
        self.tensors = [preprocess_image(decode_frame(f), spec)[0] for f in frames[:8]]
        for i in range(WARMUP_RUNS):
            self.session.run(self.names, {spec.name: self.tensors[i % len(self.tensors)]})

    def loop(self, seconds: float, mode: Mode, first: int) -> dict[str, Any]:
        """Run frames from index ``first`` on for ``seconds``; the frame count and per-frame times."""
        from appliance.runtime.processing import decode_frame, decode_outputs, preprocess_image

        spec, names, frames = self.spec, self.names, self.frames
        stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "infer": []}
        per_frame: list[float] = []
        n = first
        start = time.perf_counter()
        end = start + seconds
        now = start
        while now < end:
            t1 = time.perf_counter()
            if mode == "pipeline":
                rgb = decode_frame(frames[n % len(frames)])
                t2 = time.perf_counter()
                tensor, transform = preprocess_image(rgb, spec)
                t3 = time.perf_counter()
                raw = self.session.run(names, {spec.name: tensor})
                decode_outputs(self.card, dict(zip(names, raw, strict=True)), transform)
                now = time.perf_counter()
                if len(per_frame) < MAX_SAMPLES:
                    stages["decode"].append(t2 - t1)
                    stages["preprocess"].append(t3 - t2)
                    stages["infer"].append(now - t3)
            else:
                self.session.run(names, {spec.name: self.tensors[n % len(self.tensors)]})
                now = time.perf_counter()
            if len(per_frame) < MAX_SAMPLES:
                per_frame.append(now - t1)
            n += 1
        return {"frames": n - first, "elapsed": now - start, "per_frame": per_frame, "stages": stages}


def _run_loops(work: _Work, seconds: float, mode: Mode, loops: int) -> dict[str, Any]:
    """``loops`` threads running the loop at once on the one session; their reports merged."""
    if loops == 1:
        return work.loop(seconds, mode, 0)
    reports: list[dict[str, Any]] = [{} for _ in range(loops)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            reports[i] = work.loop(seconds, mode, i * 7)
        except Exception as e:  # noqa: BLE001 - re-raised in the process's main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = max(r["elapsed"] for r in reports)
    return {"frames": sum(r["frames"] for r in reports), "elapsed": elapsed,
            "fps": sum(r["frames"] / r["elapsed"] for r in reports),
            "per_frame": [v for r in reports for v in r["per_frame"]],
            "stages": {k: [v for r in reports for v in r["stages"][k]] for k in ("decode", "preprocess", "infer")}}


def _serve(conn: Connection, model_dir: str, frames: list[bytes], threads: int, loops: int, core: int | None,
           barrier: Barrier) -> None:
    """One process of a layout: load and warm up once, then run the loops each time it is asked."""
    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
        work = _Work(model_dir, frames, threads, loops)
        conn.send({"ready": True, "session_mb": work.session_mb, "load_s": work.load_s})
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it with the layout's name
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "run":
            return
        _, seconds, mode = msg
        try:
            barrier.wait(LOAD_TIMEOUT_S)
            conn.send(_run_loops(work, seconds, mode, loops))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            barrier.abort()
            conn.send({"error": f"{type(e).__name__}: {e}"})


class LimitPool:
    """The processes of one layout, with their sessions loaded, waiting for ``run``."""

    def __init__(self, model_dir: Path, frames: list[bytes], processes: int, threads: int, loops: int = 1) -> None:
        self.processes, self.threads, self.loops = processes, threads, loops
        self.name = layout_name(processes, threads, loops)
        ctx = mp.get_context("spawn")
        # kept here: the children open the barrier's semaphores by name after start() has dropped its args
        self._barrier = barrier = ctx.Barrier(processes)
        cores = sorted(os.sched_getaffinity(0))
        pin = threads == 1 and loops == 1 and processes <= len(cores)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            self._conns.append(parent)
            self._procs.append(ctx.Process(target=_serve, daemon=True, args=(
                child, str(model_dir), frames, threads, loops, cores[i] if pin else None, barrier)))
        self.session_mb = 0.0
        self.load_s = 0.0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reports(self, timeout: float, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for conn in self._conns:
            left = deadline - time.monotonic()
            if left <= 0 or not conn.poll(left):
                raise BenchError(f"limit layout {self.name}: no answer to {what} within {timeout:g} s")
            out.append(conn.recv())
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise BenchError(f"limit layout {self.name} failed in {what}: {errors[0]}")
        return out

    def start(self) -> None:
        for p in self._procs:
            p.start()
        ready = self._reports(LOAD_TIMEOUT_S, "loading")
        self.session_mb = sorted(r["session_mb"] for r in ready)[len(ready) // 2]
        self.load_s = sorted(r["load_s"] for r in ready)[len(ready) // 2]

    def run(self, seconds: float, mode: Mode) -> LayoutResult:
        """All processes loop for ``seconds``, starting together; their frame rates summed."""
        import numpy as np

        for conn in self._conns:
            conn.send(("run", seconds, mode))
        reports = self._reports(seconds + REPORT_GRACE_S, f"a {seconds:g} s {mode} run")
        per_process = [r.get("fps", r["frames"] / r["elapsed"]) for r in reports]
        per_frame = [v for r in reports for v in r["per_frame"]]
        stage_ms = {k: float(np.median([v for r in reports for v in r["stages"][k]]) * 1000) if mode == "pipeline"
                    else 0.0 for k in ("decode", "preprocess", "infer")}
        return LayoutResult(
            name=self.name, mode=mode, processes=self.processes, threads=self.threads, loops=self.loops,
            seconds=seconds,
            frames=sum(r["frames"] for r in reports), fps=sum(per_process), per_frame_ms=_percentiles(per_frame),
            stage_ms=stage_ms, session_mb=self.session_mb, load_s=self.load_s, per_process_fps=per_process)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for p in self._procs:
            if p.pid is None:
                continue  # never started
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in self._conns:
            conn.close()
