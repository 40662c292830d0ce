"""How the worker runs a session: through I/O binding where the session runs on a GPU, plainly on the CPU,
with the frames that wait for the same model stacked into one run, and a lone frame on every core or one.

This machine has no GPU: the bound run is checked in real ONNX Runtime sessions with the buffer on the CPU
(the same calls a GPU takes, with another device name), the choice of device at the provider seam with the
providers and options a CUDA and a TensorRT session report, and the fall-back with a device this build of
ONNX Runtime cannot place an input on."""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.runtime.binding import BoundRun, runner, session_device
from appliance.runtime.messages import ImageJob, ModelSpec, WorkerConfig
from appliance.runtime.partitions import GPU_MAX_BATCH, plan_partitions
from appliance.runtime.worker import (
    LONE_COMPARE_EVERY,
    LONE_TRIAL_RUNS,
    _LoneChoice,
    _Model,
    _next_jobs,
    _warm_up,
    session_options,
)
from tests.test_partitions import TRT, inventory


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from appliance.demo.modelgen import build_classifier

    return build_classifier(tmp_path_factory.mktemp("classifier"), name="demo-classifier-batch", batch="N")


def cpu_session(folder: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession((folder / "model.onnx").read_bytes(), sess_options=session_options(1),
                                providers=["CPUExecutionProvider"])


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 64, 64), dtype=np.float32)  # the classifier's input


def names(session: Any) -> tuple[str, list[str]]:
    return session.get_inputs()[0].name, [o.name for o in session.get_outputs()]


def test_a_bound_run_gives_the_answers_of_a_plain_run_for_every_batch_size_and_thread(classifier: Path) -> None:
    session = cpu_session(classifier)
    name, outputs = names(session)
    bound = BoundRun(session, name, outputs, "cpu", 0)
    plain = lambda x: session.run(outputs, {name: x})[0]
    for n, seed in [(1, 1), (1, 2), (4, 3), (1, 4), (8, 5)]:  # a new batch size replaces the thread's buffer
        x = frames(n, seed)
        [got] = bound(x)
        assert got.shape == (n, 3) and np.array_equal(got, plain(x))
    earlier = bound(frames(1, 6))[0]
    bound(frames(1, 7))
    assert np.array_equal(earlier, plain(frames(1, 6))), "an answer is a copy: the next run does not change it"

    wrong: list[str] = []

    def executor(seed: int) -> None:  # executors run the same session at once, each with a buffer of its own
        for i in range(25):
            x = frames(1, seed * 100 + i)
            if not np.array_equal(bound(x)[0], plain(x)):
                wrong.append(f"thread {seed}, frame {i}")

    threads = [threading.Thread(target=executor, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [], "a thread got another thread's frame's answer"


class RecordedSession:
    """What an ONNX Runtime session on a GPU reports of its providers, in the form ONNX Runtime's API gives it
    (``get_providers``, ``get_provider_options``): the seam where the worker decides how to run it."""

    def __init__(self, provider: str, device_id: str) -> None:
        self._provider, self._device_id = provider, device_id

    def get_providers(self) -> list[str]:
        return [self._provider, "CPUExecutionProvider"]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {self._provider: {"device_id": self._device_id, "gpu_mem_limit": "16106127360"},
                "CPUExecutionProvider": {}}


def test_a_session_on_a_gpu_runs_bound_to_its_device_and_one_on_the_cpu_plainly(classifier: Path) -> None:
    assert session_device(RecordedSession("CUDAExecutionProvider", "0")) == ("cuda", 0)
    assert session_device(RecordedSession("TensorrtExecutionProvider", "1")) == ("cuda", 1)
    run = runner(RecordedSession("CUDAExecutionProvider", "2"), "input", ["logits"])
    assert isinstance(run, BoundRun) and (run.device, run.device_id) == ("cuda", 2)
    session = cpu_session(classifier)
    assert session_device(session) is None and not isinstance(runner(session, *names(session)), BoundRun)


def test_a_gpu_plan_on_a_machine_without_gpu_runs_plainly_on_the_cpu(classifier: Path) -> None:
    """ONNX Runtime falls back to the CPU there (the partition reports it as an error): nothing is bound."""
    import onnxruntime as ort

    from appliance.runtime.partitions import session_providers

    plan = plan_partitions("auto", inventory("t4-single.json"), TRT)[0]
    options = session_options(1)
    options.log_severity_level = 4  # the CUDA provider's load failure is expected here
    try:
        session = ort.InferenceSession((classifier / "model.onnx").read_bytes(), sess_options=options,
                                       providers=session_providers(plan))
    except Exception as e:  # noqa: BLE001 - a build that refuses outright shows the same: nothing runs bound
        pytest.skip(f"this ONNX Runtime refuses the CUDA provider outright: {e}")
    if session.get_providers()[0] != "CPUExecutionProvider":
        pytest.skip("this machine has a GPU")
    assert not isinstance(runner(session, *names(session)), BoundRun)


def test_a_binding_the_device_refuses_at_load_falls_back_to_plain_runs_and_says_why(classifier: Path) -> None:
    data = (classifier / "model.onnx").read_bytes()
    spec = ModelSpec("demo-classifier-batch@1.0.0", str(classifier / "model.onnx"), hashlib.sha256(data).hexdigest(),
                     (classifier / "model.json").read_text())
    session = cpu_session(classifier)
    model = _Model(spec, session)
    # a device this build of ONNX Runtime cannot place an input on: the buffer cannot be made
    model.run = BoundRun(session, model.card.input.name, model.output_names, "dml", 0)
    _warm_up(model)
    assert not isinstance(model.run, BoundRun)
    assert model.note.startswith("I/O binding on dml:0 failed (") and "the model runs without it" in model.note
    x = frames(2, 9)
    assert np.array_equal(model.run(x)[0], session.run(model.output_names, {model.card.input.name: x})[0])


def jobs(n: int) -> queue.SimpleQueue[ImageJob]:
    q: queue.SimpleQueue[ImageJob] = queue.SimpleQueue()
    for i in range(n):
        q.put(ImageJob(i, ("m@1",), b""))
    return q


def test_a_gpu_worker_batches_the_frames_already_waiting_and_waits_for_none() -> None:
    gpu0, cpu = plan_partitions("auto", inventory("t4-single.json"), TRT)
    assert (gpu0.max_batch, cpu.max_batch) == (GPU_MAX_BATCH, 1), "a CPU's executors run frames side by side"
    config = WorkerConfig(max_batch=gpu0.max_batch)  # the default max_batch_delay_ms of 0
    waiting = jobs(GPU_MAX_BATCH + 3)
    assert [j.job_id for j in _next_jobs(waiting, config)] == list(range(GPU_MAX_BATCH))
    assert [j.job_id for j in _next_jobs(waiting, config)] == [GPU_MAX_BATCH, GPU_MAX_BATCH + 1, GPU_MAX_BATCH + 2]
    arrive_later = jobs(1)
    threading.Timer(0.5, lambda: arrive_later.put(ImageJob(99, ("m@1",), b""))).start()
    assert [j.job_id for j in _next_jobs(arrive_later, config)] == [0], "a lone frame does not wait for company"
    assert [j.job_id for j in _next_jobs(arrive_later, config)] == [99]
    with_delay = jobs(1)
    threading.Timer(0.05, lambda: with_delay.put(ImageJob(7, ("m@1",), b""))).start()
    waited = WorkerConfig(max_batch=2, max_batch_delay_s=30.0)  # runtime.max_batch_delay_ms: wait for company
    assert [j.job_id for j in _next_jobs(with_delay, waited)] == [0, 7]


def choices(lone: _LoneChoice, runs: int, seconds: dict[bool, float]) -> list[bool]:
    """``runs`` lone frames through ``lone``, each taking what ``seconds`` says for the way it ran."""
    made = []
    for _ in range(runs):
        wide = lone.wide()
        lone.record(wide, seconds[wide])
        made.append(wide)
    return made


def test_a_lone_frame_runs_on_every_core_unless_one_core_has_lately_been_faster_for_that_model() -> None:
    """As the worker measures a model's lone runs while serving: a camera alone with a model of about a millisecond
    gets one core (every core was measured slower there, the daemon and broker holding the others); one with a
    costly model keeps every core; both ways stay measured, so a change of conditions changes the choice."""
    cheap = _LoneChoice()
    first = choices(cheap, LONE_TRIAL_RUNS, {True: 0.0024, False: 0.0012})
    assert first == [True] * LONE_TRIAL_RUNS, "a model's first lone frames get every core"
    later = choices(cheap, 10 * LONE_COMPARE_EVERY, {True: 0.0024, False: 0.0012})
    assert later.count(True) == 10 and later.count(False) == 10 * LONE_COMPARE_EVERY - 10, \
        "one core from then on, and every core tried again once in LONE_COMPARE_EVERY"
    back = choices(cheap, 6 * LONE_COMPARE_EVERY, {True: 0.0008, False: 0.0012})  # the daemon is idle again
    assert back[-LONE_COMPARE_EVERY:].count(True) == LONE_COMPARE_EVERY - 1, "every core again once it is faster"

    costly = _LoneChoice()
    made = choices(costly, LONE_TRIAL_RUNS + 10 * LONE_COMPARE_EVERY, {True: 0.0066, False: 0.0122})
    assert made.count(False) == 1 + 10, "one core tried once after the trial, then once in LONE_COMPARE_EVERY"
