"""The limit: the same work as the appliance's worker, done by raw ONNX Runtime in tight loops.

Each loop decodes a pre-encoded JPEG, preprocesses it and runs the model (``mode="pipeline"``), or only
runs the model on a preprocessed tensor (``mode="infer"``), with the decode and preprocess functions and
session options the worker uses (``appliance.runtime.worker``): ``intra_op_num_threads`` threads,
one inter-op thread, sequential execution. A *layout* is ``processes`` spawned processes with
``threads`` intra-op threads each; with one thread per process each process is pinned to its own
core, as the appliance pins a partition's worker.

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
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal, Self

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


def session_options(threads: int) -> Any:
    """The worker's session options (``appliance.runtime.worker._load``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def layout_name(processes: int, threads: int) -> str:
    return f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


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


def _serve(conn: Connection, model_dir: str, frames: list[bytes], threads: int, core: int | None,
           barrier: Barrier) -> None:
    """One process of a layout: load and warm up once, then run a loop each time it is asked."""
    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
        import numpy as np
        import onnxruntime as ort

        from appliance.runtime.processing import decode_image, decode_outputs, preprocess_image
        from formats.model_card import ImageInput, ModelCard

        card = ModelCard.load(Path(model_dir) / "model.json")
        spec = card.input
        if not isinstance(spec, ImageInput):
            raise TypeError("the benchmark model takes images")
        names = card.output_names()
        before = _rss_mb()
        t0 = time.perf_counter()
        data = (Path(model_dir) / "model.onnx").read_bytes()
        session = ort.InferenceSession(data, sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"])
        session.run(names, {spec.name: np.zeros((1, 3, spec.height, spec.width), np.float32)})
        load_s = time.perf_counter() - t0
        session_mb = _rss_mb() - before
        tensors = [preprocess_image(decode_image(f), spec) for f in frames[:8]]
        for i in range(WARMUP_RUNS):
            session.run(names, {spec.name: tensors[i % len(tensors)][0]})
        conn.send({"ready": True, "session_mb": session_mb, "load_s": load_s})
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
            stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "infer": []}
            per_frame: list[float] = []
            barrier.wait(LOAD_TIMEOUT_S)
            n = 0
            start = time.perf_counter()
            end = start + seconds
            now = start
            while now < end:
                t1 = time.perf_counter()
                if mode == "pipeline":
                    rgb = decode_image(frames[n % len(frames)])
                    t2 = time.perf_counter()
                    tensor, transform = preprocess_image(rgb, spec)
                    t3 = time.perf_counter()
                    raw = session.run(names, {spec.name: tensor})
                    decode_outputs(card, dict(zip(names, raw, strict=True)), transform)
                    now = time.perf_counter()
                    if len(per_frame) < MAX_SAMPLES:
                        stages["decode"].append(t2 - t1)
                        stages["preprocess"].append(t3 - t2)
                        stages["infer"].append(now - t3)
                else:
                    session.run(names, {spec.name: tensors[n % len(tensors)][0]})
                    now = time.perf_counter()
                if len(per_frame) < MAX_SAMPLES:
                    per_frame.append(now - t1)
                n += 1
            conn.send({"frames": n, "elapsed": now - start, "per_frame": per_frame, "stages": stages})
        except Exception as e:  # noqa: BLE001 - reported to the parent
            barrier.abort()
            conn.send({"error": f"{type(e).__name__}: {e}"})


class LimitPool:
    """The processes of one layout, with their sessions loaded, waiting for ``run``."""

    def __init__(self, model_dir: Path, frames: list[bytes], processes: int, threads: int) -> None:
        self.processes, self.threads = processes, threads
        self.name = layout_name(processes, threads)
        ctx = mp.get_context("spawn")
        # kept here: the children open the barrier's semaphores by name after start() has dropped its args
        self._barrier = barrier = ctx.Barrier(processes)
        cores = sorted(os.sched_getaffinity(0))
        pin = threads == 1 and processes <= len(cores)
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(processes):
            parent, child = ctx.Pipe()
            self._conns.append(parent)
            self._procs.append(ctx.Process(target=_serve, daemon=True, args=(
                child, str(model_dir), frames, threads, cores[i] if pin else None, barrier)))
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
        per_process = [r["frames"] / r["elapsed"] for r in reports]
        per_frame = [v for r in reports for v in r["per_frame"]]
        stage_ms = {k: float(np.median([v for r in reports for v in r["stages"][k]]) * 1000) if mode == "pipeline"
                    else 0.0 for k in ("decode", "preprocess", "infer")}
        return LayoutResult(
            name=self.name, mode=mode, processes=self.processes, threads=self.threads, seconds=seconds,
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
