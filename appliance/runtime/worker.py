"""The worker process: owns the ONNX Runtime sessions of one partition and runs jobs in order.

Runs in a process of its own (spawned, never forked) so that a model that crashes or hangs takes
down this process only; the supervisor in the main process restarts it. Decoding and preprocessing
happen here too, so the main process never holds decoded pixels.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
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
)


class _Model:
    def __init__(self, spec: ModelSpec, session: Any) -> None:
        from formats.model_card import ModelCard

        self.spec = spec
        self.card = ModelCard.parse(spec.card_json.encode(), spec.key)
        self.session = session
        self.output_names = self.card.output_names()


def _threads(config: WorkerConfig) -> int:
    if config.intra_op_threads:
        return config.intra_op_threads
    return len(config.cores) if config.cores else len(os.sched_getaffinity(0))


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
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(config)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # load from the bytes that were hashed, so the file cannot change between check and use
    session = ort.InferenceSession(data, sess_options=options, providers=list(config.providers))
    return _Model(spec, session), (time.perf_counter() - t0) * 1000


# Shared with the supervisor: [job id, index of the model running, -1 while decoding]. If this process
# dies or hangs, the supervisor reads it to blame the model that was running, not its neighbours.
Current = Any


def _mark(current: Current, job_id: int, index: int) -> None:
    current[0] = job_id
    current[1] = index


def _run(job: ImageJob | VectorJob, models: dict[str, _Model], config: WorkerConfig, current: Current) -> JobDone:
    """Decode the frame once (images), then feed each of the job's models in turn."""
    from appliance.runtime.processing import (
        FrameRejected,
        Letterbox,
        decode_image,
        decode_outputs,
        preprocess_image,
        vector_from_telemetry,
    )
    from formats.model_card import ImageInput

    t0 = time.perf_counter()
    _mark(current, job.job_id, -1)
    rgb = None
    if isinstance(job, ImageJob):
        try:
            rgb = decode_image(job.data, max_pixels=config.max_image_pixels)
        except FrameRejected as e:
            return JobDone(job.job_id, rejected=(e.reason, e.detail))
    done = JobDone(job.job_id, decode_s=time.perf_counter() - t0)
    for index, key in enumerate(job.models):
        _mark(current, job.job_id, index)
        model = models.get(key)
        if model is None:
            done.errors[key] = f"model {key} is not loaded in this worker"
            continue
        t1 = time.perf_counter()
        spec = model.card.input
        transform: Letterbox | None = None
        try:
            if isinstance(spec, ImageInput):
                assert rgb is not None, "an image model was given telemetry"
                tensor, transform = preprocess_image(rgb, spec)
            else:
                assert isinstance(job, VectorJob), "a telemetry model was given an image"
                tensor = vector_from_telemetry(job.values, spec)
        except FrameRejected as e:
            return JobDone(job.job_id, rejected=(e.reason, e.detail))
        try:
            raw = model.session.run(model.output_names, {spec.name: tensor})
            done.results[key] = decode_outputs(model.card, dict(zip(model.output_names, raw)), transform)
        except Exception as e:  # noqa: BLE001 - reported per model, the frame's other models still run
            done.errors[key] = f"{type(e).__name__}: {e}"
        done.infer_s[key] = time.perf_counter() - t1
    return done


def worker_main(conn: Connection, config: WorkerConfig, current: Current) -> None:
    """Entry point of the worker process."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the daemon stops us in order
    # (Shutdown), and if the daemon itself dies the pipe closes and we exit on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.cores:
        os.sched_setaffinity(0, config.cores)
    models: dict[str, _Model] = {}
    conn.send(Ready(pid=os.getpid(), threads=_threads(config)))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(msg, (ImageJob, VectorJob)):
            conn.send(_run(msg, models, config, current))
        elif isinstance(msg, Load):
            try:
                model, ms = _load(msg.spec, config)
            except Exception as e:  # noqa: BLE001 - reported to the supervisor, the worker keeps serving
                conn.send(LoadFailed(msg.spec.key, f"{type(e).__name__}: {e}"))
                continue
            models[msg.spec.key] = model
            conn.send(Loaded(msg.spec.key, tuple(model.session.get_providers()), ms))
        elif isinstance(msg, Unload):
            models.pop(msg.key, None)  # the session (and its memory arena) is freed with it
        elif isinstance(msg, Shutdown):
            return
