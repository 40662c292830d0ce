"""The worker process: owns the ONNX Runtime sessions of one partition and runs its jobs.

Runs in a process of its own (spawned, never forked) so that a model that crashes or hangs takes
down this process only; the supervisor in the main process restarts it. Decoding and preprocessing
happen here too, so the main process never holds decoded pixels.

Threads: the main thread only reads the pipe and hands messages on, so the daemon's writes never
wait on a busy worker. ``executors`` threads each take a job (or a batch), decode, preprocess and run
it; on a CPU partition there is one per core, sharing each session, and each runs the model on its own
thread (one intra-op thread: no thread pool), so the cores work on different frames side by side
(ONNX Runtime, Pillow and NumPy release the GIL for the heavy parts). A frame that has the worker to
itself (no other job received and not answered, and no two met in the worker for half a second) runs
instead on a second session of the same model with a thread per core (``alone_threads``), so a lone
camera gets the whole box, unless its lone frames have lately run faster on one core (a model of about a
millisecond, whose run would wait for cores the daemon and the broker hold: see ``_LoneChoice``). The other layouts (one pool shared by the executors, one executor with
every core) are measured beside this one in docs/BENCHMARKS.md (section 11). The price is the second
session's memory: its own copy of the optimised weights and its arena (sharing the initializers saves
nothing, since ONNX Runtime rewrites the weights for its CPU kernels per session, and its Python API
cannot share prepacked weights). One
loader thread loads and unloads models in order, at a lower CPU priority where it can, so a model
being loaded or warmed up never stops or slows the models that are serving. The pool threads of the
lone-frame sessions, made by the loader, inherit its priority: they run only while a frame is alone,
and then yield to the daemon and the broker (made at the serving priority, their creation took cores
from serving during a hot swap: 6 frames skipped in docs/BENCHMARKS.md section 6 against 0).
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from appliance.runtime.messages import (
    ImageJob,
    JobDone,
    Load,
    Loaded,
    LoadFailed,
    ModelSpec,
    Ready,
    Shutdown,
    Unload,
    VectorJob,
    WorkerConfig,
    encode,
)


class _Model:
    def __init__(self, spec: ModelSpec, session: Any, alone: Any = None) -> None:
        from appliance.runtime.binding import runner
        from formats.model_card import ModelCard

        self.spec = spec
        self.card = ModelCard.parse(spec.card_json.encode(), spec.key)
        self.session = session
        self.alone = alone  # the session with a thread per core, for a job that has the worker to itself
        self.output_names = self.card.output_names()
        # how each session runs: through I/O binding on a GPU (see binding.py), plainly on the CPU
        self.run = runner(session, self.card.input.name, self.output_names)
        self.run_alone = None if alone is None else runner(alone, self.card.input.name, self.output_names)
        self.lone = _LoneChoice()
        self.note = ""  # what the worker had to fall back on while loading, for the daemon's log
        # frames can be stacked along a dynamic first axis (not for decoders whose outputs have no batch axis)
        first = session.get_inputs()[0].shape[0] if session.get_inputs() and session.get_inputs()[0].shape else 1
        self.batchable = not isinstance(first, int) and self.card.output.decoder != "boxes_scores_classes"


def _threads(config: WorkerConfig) -> int:
    """ONNX Runtime intra-op threads per session (all executors share the session): unless set, the cores
    shared out among the executors."""
    if config.intra_op_threads:
        return config.intra_op_threads
    cores = len(config.cores) if config.cores else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, config.executors))


LOADER_NICE = 10  # added to the loader thread's nice value: loading yields the cores to serving models


def _lower_loader_priority(config: WorkerConfig) -> None:
    """Let the serving executors have the cores while a model loads and warms up.

    Linux keeps a nice value per thread, and the threads a thread creates inherit it: only on the CPU, where
    the executors' sessions have no intra-op thread pool (one thread each, the executor's own), can the
    loader be niced without threads it starts serving at that priority for ever (the pools of the sessions
    for frames alone are niced with it, on purpose: see the module's docstring). NumPy's and ONNX Runtime's helper threads
    start when they are first imported, so they are imported first, at the serving priority."""
    if _threads(config) != 1 or any(name != "CPUExecutionProvider" for name, _ in config.providers):
        return
    try:
        import numpy  # noqa: F401 - see above
        import onnxruntime  # noqa: F401

        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + LOADER_NICE)
    except ImportError:
        pass  # each load then fails with its own LoadFailed, which says what is missing
    except OSError:
        pass  # not allowed here: loads then compete with serving at the same priority, as before


ALONE_AFTER_S = 0.5  # a job runs on every core only if no two jobs were in the worker together for this long


class _InFlight:
    """Jobs this worker has received and not answered yet, and when two or more were last in it together."""

    def __init__(self) -> None:
        self._count, self._lock = 0, threading.Lock()
        self._together = -ALONE_AFTER_S

    def add(self, n: int) -> None:
        with self._lock:
            self._count += n
            if self._count > 1:
                self._together = time.monotonic()

    def alone(self, jobs: int) -> bool:
        """True if the worker holds no job but these ``jobs`` and has been running one job at a time lately: a
        lone camera, or cameras whose frames seldom meet. Where frames keep meeting (two cameras or more
        sending as fast as they get answers), a job alone for a moment (while the other's result travels and
        its next frame comes) would run on every core only to have the next frame wait for a core, so it runs
        as the others do."""
        return self._count <= jobs and time.monotonic() - self._together > ALONE_AFTER_S


LONE_TRIAL_RUNS = 8  # a model's first lone frames run on every core, before one core is tried
LONE_COMPARE_EVERY = 32  # then one lone frame in this many runs the other way, to keep both figures current
LONE_SMOOTHING = 0.5  # weight of the newest run in each figure (an exponential moving average)


class _LoneChoice:
    """Whether a frame alone in the worker runs faster on every core or on one, for one model, from how long its
    lone runs took lately each way.

    Every core is faster for a model that has the box to itself, but not always while serving: for a model of
    about a millisecond the daemon and the broker, busy with the frame's result and the next frame, hold the
    other cores while the run would need them (bench-cheap at one stream, 2 cores: 2.3 ms a run on both, and
    with this choice 1.7 ms, 0.56 -> 0.62 x limit(1)). So the choice is measured where it is made, on the
    frames themselves."""

    def __init__(self) -> None:
        self._runs = 0
        self._s: dict[bool, float] = {}  # seconds per run, by "on every core"

    def wide(self) -> bool:
        """True: run this lone frame on every core."""
        self._runs += 1
        if self._runs <= LONE_TRIAL_RUNS:
            return True
        if False not in self._s:
            return False
        faster = self._s.get(True, 0.0) <= self._s[False]
        return faster != (self._runs % LONE_COMPARE_EVERY == 0)

    def record(self, wide: bool, seconds: float) -> None:
        old = self._s.get(wide)
        self._s[wide] = seconds if old is None else old + LONE_SMOOTHING * (seconds - old)


def session_options(threads: int, spinning: bool = True) -> Any:
    """The worker's ONNX Runtime session options: ``threads`` intra-op threads, one inter-op thread, sequential
    execution; ``spinning`` False makes idle pool threads yield their cores at once."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _load(spec: ModelSpec, config: WorkerConfig) -> tuple[_Model, float]:
    import onnxruntime as ort

    t0 = time.perf_counter()
    with open(spec.path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise ValueError(
            f"{spec.path} has changed since install (sha256 {digest[:12]}… recorded {spec.sha256[:12]}…); "
            "reinstall the model package"
        )
    threads = _threads(config)
    providers = [(n, dict(o)) for n, o in config.providers]
    # several executors sharing the session's threads: an idle thread must yield its core, not spin on it
    options = session_options(threads, spinning=config.executors == 1 or threads == 1)
    # load from the bytes that were hashed, so the file cannot change between check and use
    session = ort.InferenceSession(data, sess_options=options, providers=providers)
    alone = None
    if config.alone_threads > threads:
        # its threads spin between the operators of a run and stop as the run ends: while they spin after it,
        # they hold the cores the daemon and the broker need to answer this frame and bring the next.
        # Measured in the appliance at one stream (2 cores, two runs each): 0.94-0.99 x naive so, 0.82 spinning
        # throughout (171 % of a core), 0.89-0.95 not spinning at all (the run itself a millisecond slower)
        options = session_options(config.alone_threads)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        alone = ort.InferenceSession(data, sess_options=options, providers=providers)
    model = _Model(spec, session, alone)
    _warm_up(model)
    return model, (time.perf_counter() - t0) * 1000


def _warm_up(model: _Model) -> None:
    """One run on zeros, so the first real frame does not pay for lazy initialisation. A session that cannot
    run through I/O binding runs plainly instead (``model.note`` says why)."""
    import numpy as np

    from appliance.runtime.binding import BoundRun, plain_run
    from formats.model_card import ImageInput

    spec = model.card.input
    if isinstance(spec, ImageInput):
        shape = (1, 3, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, 3)
        tensor = np.zeros(shape, dtype=np.float32 if spec.dtype == "float32" else np.uint8)
    else:
        tensor = np.zeros((1, len(spec.features)), dtype=np.float32)
    try:
        model.run(tensor)
    except Exception as e:
        if not isinstance(model.run, BoundRun):
            raise
        # the device could not take the input this way (any failure of the binding means the same): run plainly
        model.note = (f"I/O binding on {model.run.device}:{model.run.device_id} failed "
                      f"({type(e).__name__}: {e}); the model runs without it")
        model.run = plain_run(model.session, spec.name, model.output_names)
        model.run(tensor)
    if model.run_alone is not None:
        model.run_alone(tensor)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024


# Shared with the supervisor: per executor [job id, index of the model running (-1: decoding or idle)],
# then one flag that is 1 while a model loads. If this process dies or hangs, the supervisor reads it to
# blame the model that was running, not its neighbours (see ``current_slots``).
Current = Any


def current_slots(executors: int) -> list[int]:
    """The initial contents of the shared marker array for a worker with ``executors`` executor threads."""
    return [0, -1] * executors + [0]


class _Marker:
    """One executor's slot in the shared marker array."""

    def __init__(self, current: Current, slot: int) -> None:
        self._current, self._at = current, 2 * slot

    def __call__(self, job_id: int, index: int) -> None:
        self._current[self._at] = job_id
        self._current[self._at + 1] = index


def _run_batch(jobs: list[ImageJob | VectorJob], models: dict[str, _Model], config: WorkerConfig,
               mark: _Marker, inflight: _InFlight) -> list[JobDone]:
    """Decode each frame once, then feed each model its frames: in one batch where the model allows it."""
    import numpy as np

    from appliance.runtime.processing import FrameRejected, decode_frame, decode_outputs

    dones: dict[int, JobDone] = {}
    pixels: dict[int, Any] = {}
    alone_ids: set[int] = set()
    for job in jobs:
        t0 = time.perf_counter()
        mark(job.job_id, -1)
        if isinstance(job, ImageJob):
            try:
                pixels[job.job_id] = decode_frame(job.data, max_pixels=config.max_image_pixels)
            except FrameRejected as e:
                dones[job.job_id] = JobDone(job.job_id, rejected=(e.reason, e.detail))
                continue
        dones[job.job_id] = JobDone(job.job_id, decode_s=time.perf_counter() - t0)
    keys = list(dict.fromkeys(k for job in jobs for k in job.models))
    for key in keys:
        group = [j for j in jobs if key in j.models and dones[j.job_id].rejected is None]
        model = models.get(key)
        if model is None:
            for job in group:
                dones[job.job_id].errors[key] = f"model {key} is not loaded in this worker"
            continue
        prepared = []
        for job in group:
            t0 = time.perf_counter()
            try:
                prepared.append((job, *_prepare(model, job, pixels.get(job.job_id))))
            except FrameRejected as e:
                dones[job.job_id] = JobDone(job.job_id, rejected=(e.reason, e.detail))
                continue
            dones[job.job_id].prepare_s[key] = time.perf_counter() - t0
        size = config.max_batch if model.batchable else 1
        for chunk in (prepared[i:i + size] for i in range(0, len(prepared), size)):
            mark(chunk[0][0].job_id, chunk[0][0].models.index(key))
            # no job in the worker but these, lately: every core for them (a job arriving meanwhile waits for a core)
            alone = model.run_alone is not None and inflight.alone(len(jobs))
            wide = alone and model.lone.wide()
            run = model.run_alone if wide and model.run_alone is not None else model.run
            t1 = time.perf_counter()
            try:
                feed = chunk[0][1] if len(chunk) == 1 else np.concatenate([tensor for _, tensor, _ in chunk])
                raw = run(feed)
                for i, (job, _, transform) in enumerate(chunk):
                    outputs = {n: (r if len(chunk) == 1 else r[i:i + 1]) for n, r in zip(model.output_names, raw)}
                    dones[job.job_id].results[key] = decode_outputs(model.card, outputs, transform)
            except Exception as e:  # noqa: BLE001 - reported per model, the frames' other models still run
                for job, _, _ in chunk:
                    dones[job.job_id].errors[key] = f"{type(e).__name__}: {e}"
            elapsed = time.perf_counter() - t1
            if alone:
                model.lone.record(wide, elapsed)
            for job, _, _ in chunk:
                dones[job.job_id].infer_s[key] = elapsed
                dones[job.job_id].batch[key] = len(chunk)
                if wide:
                    alone_ids.add(job.job_id)
    mark(jobs[-1].job_id, -1)
    return [replace(dones[job.job_id], alone=True) if job.job_id in alone_ids else dones[job.job_id] for job in jobs]


def _prepare(model: _Model, job: ImageJob | VectorJob, rgb: Any) -> tuple[Any, Any]:
    """The input tensor for one job, and the transform that maps boxes back to its frame."""
    from appliance.runtime.processing import preprocess_image, vector_from_telemetry
    from formats.model_card import ImageInput

    spec = model.card.input
    if isinstance(spec, ImageInput):
        if rgb is None:
            raise TypeError(f"model {model.spec.key} takes images, the job carries telemetry")
        return preprocess_image(rgb, spec)
    if not isinstance(job, VectorJob):
        raise TypeError(f"model {model.spec.key} takes telemetry, the job carries an image")
    return vector_from_telemetry(job.values, spec), None


def _next_jobs(jobs_in: queue.SimpleQueue[ImageJob | VectorJob], config: WorkerConfig) -> list[ImageJob | VectorJob]:
    """The next job, plus those waiting or arriving within ``max_batch_delay_s``, up to ``max_batch``."""
    jobs = [jobs_in.get()]
    deadline = time.perf_counter() + config.max_batch_delay_s
    while len(jobs) < config.max_batch:
        left = deadline - time.perf_counter()
        try:
            jobs.append(jobs_in.get(timeout=left) if left > 0 else jobs_in.get_nowait())
        except queue.Empty:
            break
    return jobs


class _Replies:
    """The pipe back to the daemon, shared by the threads of this process."""

    def __init__(self, conn: Connection) -> None:
        self._conn, self._lock = conn, threading.Lock()

    def send(self, msg: object) -> None:
        data = encode(msg)  # outside the lock
        try:
            with self._lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError):
            os._exit(0)  # the daemon is gone: nobody is left to answer


def _execute(jobs_in: queue.SimpleQueue[ImageJob | VectorJob], models: dict[str, _Model], config: WorkerConfig,
             mark: _Marker, replies: _Replies, inflight: _InFlight) -> None:
    while True:
        for done in _run_batch(_next_jobs(jobs_in, config), models, config, mark, inflight):
            inflight.add(-1)  # before the answer: the next job it brings must not find this one still counted
            replies.send(done)


def _load_in_order(control: queue.SimpleQueue[Load | Unload], models: dict[str, _Model], config: WorkerConfig,
                   current: Current, replies: _Replies) -> None:
    from appliance.runtime.binding import BoundRun

    niced = False
    while True:
        msg = control.get()
        if isinstance(msg, Unload):
            models.pop(msg.key, None)  # the session (and its memory arena) is freed once no executor runs it
            continue
        if not niced:  # at the first load, not at start: an idle worker does not import ONNX Runtime
            _lower_loader_priority(config)
            niced = True
        current[-1] = 1
        before = _rss_mb()
        try:
            model, ms = _load(msg.spec, config)
        except Exception as e:  # noqa: BLE001 - reported to the supervisor, the worker keeps serving
            replies.send(LoadFailed(msg.spec.key, f"{type(e).__name__}: {e}"))
            continue
        finally:
            current[-1] = 0
        models[msg.spec.key] = model
        replies.send(Loaded(msg.spec.key, tuple(model.session.get_providers()), ms, max(0.0, _rss_mb() - before),
                            io_binding=isinstance(model.run, BoundRun), note=model.note))


def worker_main(conn: Connection, config: WorkerConfig, current: Current) -> None:
    """Entry point of the worker process."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the daemon stops us in order
    # (Shutdown), and if the daemon itself dies the pipe closes and we exit on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(config.env)  # before ONNX Runtime (and CUDA) are first imported, in _load
    if config.cores:
        # a plan made from a recorded inventory may name cores this machine lacks: pin to those that exist
        allowed = set(config.cores) & os.sched_getaffinity(0)
        if allowed:
            os.sched_setaffinity(0, allowed)
    models: dict[str, _Model] = {}
    replies = _Replies(conn)
    jobs: queue.SimpleQueue[ImageJob | VectorJob] = queue.SimpleQueue()
    control: queue.SimpleQueue[Load | Unload] = queue.SimpleQueue()
    inflight = _InFlight()
    threading.Thread(target=_load_in_order, args=(control, models, config, current, replies),
                     name="loader", daemon=True).start()
    for slot in range(config.executors):
        threading.Thread(target=_execute, args=(jobs, models, config, _Marker(current, slot), replies, inflight),
                         name=f"executor-{slot}", daemon=True).start()
    alone_threads = config.alone_threads if config.alone_threads > _threads(config) else 0
    replies.send(Ready(pid=os.getpid(), threads=_threads(config), executors=config.executors,
                       alone_threads=alone_threads))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(msg, (ImageJob, VectorJob)):
            inflight.add(1)
            jobs.put(msg)
        elif isinstance(msg, (Load, Unload)):
            control.put(msg)
        elif isinstance(msg, Shutdown):
            return
