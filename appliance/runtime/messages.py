"""Typed messages between the main process and a partition's worker process (pickled over a pipe).

The messages sent for every frame (jobs, their results) are frozen dataclasses without slots: those
pickle through their ``__dict__`` in C, where slots dataclasses go through a ``__setstate__`` written in
Python that costs several times as much per object.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from appliance.runtime.results import Detection


def encode(msg: object) -> bytes:
    """One message as ``conn.send_bytes`` takes it and ``conn.recv()`` reads it back. The messages hold plain
    data only, so the standard pickler does (``conn.send`` builds a ForkingPickler per message, for handles)."""
    return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)


@dataclass(slots=True, frozen=True)
class WorkerConfig:
    """How a worker process is set up; one worker serves one partition."""

    partition: str = "cpu"
    # ONNX Runtime providers with their options, in order of preference
    providers: tuple[tuple[str, dict[str, str]], ...] = (("CPUExecutionProvider", {}),)
    env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES, set before ONNX Runtime loads
    cores: tuple[int, ...] = ()  # CPU cores the process is pinned to; empty: all it was given
    intra_op_threads: int = 0  # per session; 0: the cores shared out among the executors
    executors: int = 1  # threads that each run one job (or batch) at a time
    # intra-op threads of each model's second session, run while a job has the worker to itself (a lone frame
    # gets every core); 0: no second session
    alone_threads: int = 0
    max_image_pixels: int = 40_000_000
    max_batch: int = 1  # frames run through a model at once where its first axis is dynamic
    max_batch_delay_s: float = 0.0  # how long the worker waits for more frames to fill a batch (0: only those waiting)

    @property
    def expected_provider(self) -> str:
        """What every session must report first; anything else means a silent fallback (an error)."""
        return self.providers[0][0]


@dataclass(slots=True, frozen=True)
class ModelSpec:
    key: str  # name@version
    path: str  # model.onnx
    sha256: str  # recorded at install, checked again at every load
    card_json: str


# main -> worker


@dataclass(slots=True, frozen=True)
class Load:
    spec: ModelSpec


@dataclass(slots=True, frozen=True)
class Unload:
    key: str


@dataclass(frozen=True)
class ImageJob:
    job_id: int
    models: tuple[str, ...]
    data: bytes  # encoded JPEG or PNG, decoded in the worker


@dataclass(frozen=True)
class VectorJob:
    job_id: int
    models: tuple[str, ...]
    values: dict[str, float]


@dataclass(slots=True, frozen=True)
class Shutdown:
    pass


# worker -> main


@dataclass(slots=True, frozen=True)
class Ready:
    pid: int
    threads: int
    executors: int
    alone_threads: int = 0


@dataclass(slots=True, frozen=True)
class Loaded:
    key: str
    providers: tuple[str, ...]
    load_ms: float  # loading and one warm-up run
    memory_mb: float  # resident memory the worker grew by while loading (a measure for placement)
    io_binding: bool = False  # runs with its input placed on the device beforehand (see binding.py)
    note: str = ""  # what the worker fell back on while loading (the daemon logs it)


@dataclass(slots=True, frozen=True)
class LoadFailed:
    key: str
    reason: str


@dataclass(frozen=True)
class JobDone:
    job_id: int
    # per model key: the findings, or an error message
    results: dict[str, list[Detection]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # the frame itself was refused (reason, detail): nothing was run
    rejected: tuple[str, str] | None = None
    decode_s: float = 0.0
    prepare_s: dict[str, float] = field(default_factory=dict)  # per model: this frame's preprocessing
    infer_s: dict[str, float] = field(default_factory=dict)  # per model: run + decode outputs (a batch's wall time)
    batch: dict[str, int] = field(default_factory=dict)  # per model: how many frames ran together
    alone: bool = False  # ran with the worker to itself, on the session that uses every core


Job = ImageJob | VectorJob
Reply = Ready | Loaded | LoadFailed | JobDone
