"""Runs one worker process for a partition: start, load models, hand out jobs, watch, restart.

A worker that dies (crash) or overruns ``inference_timeout_s`` on a job (hang) is killed and
restarted with exponential backoff; the jobs it held fail with :class:`WorkerLost`. The model whose
job was running is given a strike; after ``strikes_before_quarantine`` strikes in a row it is
quarantined (not loaded again until reinstalled or the daemon restarts), so one poisoned model cannot
keep the partition's other models down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    Reply,
    Shutdown,
    Unload,
    VectorJob,
    WorkerConfig,
    encode,
)
from appliance.runtime.worker import current_slots, worker_main
from appliance.settings import RuntimeSettings
from appliance.status import ModelState as ModelStateName
from appliance.status import ModelStatus, WorkerStatus
from appliance.status import WorkerState as WorkerStateName
from appliance.tasks import cancel_and_wait
from common.backoff import Backoff

log = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 0.25
HEALTHY_RESET_S = 60.0  # a worker that ran this long resets the restart backoff
STOP_TIMEOUT_S = 5.0



class WorkerLost(Exception):
    """The worker died or was killed while holding the job."""


@dataclass(slots=True)
class ModelState:
    state: ModelStateName = "loading"
    reason: str = ""
    providers: tuple[str, ...] = ()
    strikes: int = 0
    memory_mb: float = 0.0  # measured at load
    io_binding: bool = False  # its input is placed on the device before each run


@dataclass(slots=True)
class _Pending:
    job: ImageJob | VectorJob
    future: asyncio.Future[JobDone]
    sent: float = field(default_factory=time.monotonic)


class WorkerSupervisor:
    def __init__(
        self,
        config: WorkerConfig,
        settings: RuntimeSettings,
        on_change: Callable[[], None] = lambda: None,
        on_restart: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.config = config
        self._settings = settings
        self._on_change = on_change  # capacity or state changed: the scheduler may dispatch
        self._once: list[Callable[[], None]] = []
        self._on_restart = on_restart
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._generation = 0
        self._desired: dict[str, ModelSpec] = {}
        self._loaded: set[str] = set()
        self.models: dict[str, ModelState] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self.state: WorkerStateName = "stopped"
        self.pid: int | None = None
        self.threads = 0  # ONNX Runtime intra-op threads per session, as the worker set them
        self.executors = config.executors  # jobs the worker runs at once
        self.alone_threads = 0  # intra-op threads of a job alone in the worker (0: no such session)
        self.restarts = 0
        self.last_restart_reason = ""
        # no jitter: one local process, nothing to spread out
        self._backoff = Backoff(settings.restart_backoff_min_s, settings.restart_backoff_max_s, jitter=0.0)
        self._failures = 0  # restarts in a row, with less than HEALTHY_RESET_S of service between them
        self._started_at = 0.0
        self._kill_reason: str | None = None
        self._kill_culprits: list[str] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._restart_handle: asyncio.TimerHandle | None = None
        self._stopping = False
        self._send_lock = threading.Lock()
        self._current: Any = None  # per executor [job id, model index], then a loading flag; see worker.py
        self._loading: dict[str, float] = {}  # model key -> when its Load was sent (loads run in order)
        self._unloading: set[str] = set()  # models to unload once the jobs that use them are done

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._spawn()
        self._watchdog = asyncio.create_task(self._watch(), name=f"watchdog-{self.config.partition}")

    async def stop(self) -> None:
        self._stopping = True
        if self._restart_handle:
            self._restart_handle.cancel()
        await cancel_and_wait(self._watchdog)
        proc = self._proc
        if proc is not None and proc.is_alive():
            self._send(Shutdown())
            await asyncio.get_running_loop().run_in_executor(None, proc.join, STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
        if self._conn is not None:
            self._release(self._conn)
        self._fail_pending("the daemon is stopping")
        self.state = "stopped"

    def _spawn(self) -> None:
        self._generation += 1
        gen = self._generation
        parent, child = self._ctx.Pipe(duplex=True)
        self._current = self._ctx.Array("q", current_slots(self.config.executors), lock=False)
        proc = self._ctx.Process(
            target=worker_main, args=(child, self.config, self._current), name=f"worker-{self.config.partition}", daemon=True
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self.pid = proc.pid
        self.state = "starting"
        self._loaded.clear()
        self._loading.clear()
        self._unloading.clear()  # a new process holds nothing
        self._started_at = time.monotonic()
        self._kill_reason = None
        self._kill_culprits = []
        assert self._loop is not None
        self._loop.add_reader(parent.fileno(), self._readable, parent, proc, gen)
        for spec in self._desired.values():
            self._request_load(spec)

    def _readable(self, conn: Connection, proc: Any, gen: int) -> None:
        """The worker's pipe has data (on the event loop: no reader thread, no cross-thread wake-up per reply).

        The worker writes each message whole, so ``recv`` never waits long for the rest of one.
        """
        try:
            msg = conn.recv()  # one per call: the loop calls again while more is waiting
        except (EOFError, OSError):
            self._release(conn)
            assert self._loop is not None
            reaping = self._loop.run_in_executor(None, proc.join, STOP_TIMEOUT_S)
            reaping.add_done_callback(lambda _: self._on_exit(gen, proc.exitcode))
            return
        self._on_reply(gen, msg)

    def _release(self, conn: Connection) -> None:
        if not conn.closed:
            if self._loop is not None:
                self._loop.remove_reader(conn.fileno())
            conn.close()

    def _send(self, msg: object) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            with self._send_lock:
                conn.send_bytes(encode(msg))
        except (OSError, ValueError):
            return False  # the pipe's reader reports the exit
        return True

    # models

    def set_models(self, specs: dict[str, ModelSpec]) -> None:
        """Make the worker hold exactly these models (loading new ones, unloading the rest)."""
        for key in list(self._desired):
            if key not in specs:
                del self._desired[key]
                self.models.pop(key, None)
                if key in self._loaded:
                    self._loaded.discard(key)
                    self._unload_when_idle(key)
        for key, spec in specs.items():
            if key in self._desired and self._desired[key] == spec:
                continue
            self._desired[key] = spec
            self.models[key] = ModelState()
            self._request_load(spec)
        self._changed()

    def _unload_when_idle(self, key: str) -> None:
        """Unload ``key`` once no job sent to the worker still needs it: executors run jobs side by side, so an
        unload must not overtake the jobs sent before it (a hot swap would fail them)."""
        if any(key in p.job.models for p in self._pending.values()):
            self._unloading.add(key)
        else:
            self._send(Unload(key))

    def _request_load(self, spec: ModelSpec) -> None:
        state = self.models.setdefault(spec.key, ModelState())
        if state.state == "quarantined":
            return
        state.state, state.reason = "loading", ""
        self._loading[spec.key] = time.monotonic()
        self._send(Load(spec))

    def on_change_once(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` at the next change of worker or model state."""
        self._once.append(callback)

    def _changed(self) -> None:
        once, self._once = self._once, []
        for cb in once:
            cb()
        self._on_change()

    def status(self) -> WorkerStatus:
        return WorkerStatus(partition=self.config.partition, state=self.state, pid=self.pid, threads=self.threads,
                            executors=self.executors, alone_threads=self.alone_threads, restarts=self.restarts,
                            last_restart_reason=self.last_restart_reason, inflight=self.inflight())

    def model_status(self) -> list[ModelStatus]:
        """The models this worker holds or is loading, by key."""
        return [ModelStatus(key=k, state=m.state, reason=m.reason, providers=m.providers,
                            partition=self.config.partition, memory_mb=round(m.memory_mb, 1),
                            io_binding=m.io_binding)
                for k, m in sorted(self.models.items())]

    def memory_used_mb(self) -> float:
        """What the ready models measured at load."""
        return sum(m.memory_mb for m in self.models.values() if m.state == "ready")

    def ready_models(self) -> set[str]:
        return {k for k, s in self.models.items() if s.state == "ready"}

    # jobs

    def inflight(self) -> int:
        return len(self._pending)

    def capacity(self) -> int:
        if self.state != "ready":
            return 0
        # each executor busy with a batch and the next one waiting
        limit = max(self._settings.max_inflight, self.executors * (self.config.max_batch + 1))
        return max(0, limit - len(self._pending))

    def submit_image(self, models: tuple[str, ...], data: bytes) -> asyncio.Future[JobDone]:
        return self._submit(ImageJob(next(self._ids), models, data))

    def submit_vector(self, models: tuple[str, ...], values: dict[str, float]) -> asyncio.Future[JobDone]:
        return self._submit(VectorJob(next(self._ids), models, values))

    def _submit(self, job: ImageJob | VectorJob) -> asyncio.Future[JobDone]:
        assert self._loop is not None
        fut: asyncio.Future[JobDone] = self._loop.create_future()
        if self.state != "ready":
            fut.set_exception(WorkerLost(f"worker {self.config.partition} is {self.state}"))
            return fut
        self._pending[job.job_id] = _Pending(job, fut)
        if not self._send(job):
            self._pending.pop(job.job_id, None)
            fut.set_exception(WorkerLost(f"worker {self.config.partition} is gone"))
        return fut

    # replies, on the event loop

    def _on_reply(self, gen: int, msg: Reply) -> None:
        if gen != self._generation:
            return
        if isinstance(msg, JobDone):
            pending = self._pending.pop(msg.job_id, None)
            if pending is not None:
                for key in msg.results:
                    state = self.models.get(key)
                    if state is not None:
                        state.strikes = 0
                if not pending.future.done():
                    pending.future.set_result(msg)
                for key in [k for k in self._unloading if k in pending.job.models]:
                    if not any(key in p.job.models for p in self._pending.values()):
                        self._unloading.discard(key)
                        if key not in self._desired:
                            self._send(Unload(key))
            self._changed()
        elif isinstance(msg, Loaded):
            self._loading.pop(msg.key, None)
            if msg.key not in self._desired:
                self._send(Unload(msg.key))
                return
            self._loaded.add(msg.key)
            state = self.models.setdefault(msg.key, ModelState())
            wanted = self.config.expected_provider
            state.memory_mb, state.io_binding = msg.memory_mb, msg.io_binding
            if msg.note:
                log.warning("model %s on %s: %s", msg.key, self.config.partition, msg.note)
            if not msg.providers or msg.providers[0] != wanted:
                state.state = "failed"
                state.reason = f"asked for {wanted} but ONNX Runtime runs it on {', '.join(msg.providers)}"
                log.error("model %s on %s: %s", msg.key, self.config.partition, state.reason)
            else:
                state.state, state.reason, state.providers = "ready", "", msg.providers
                log.info("model %s ready on %s (%s, %.0f ms)", msg.key, self.config.partition,
                         msg.providers[0], msg.load_ms)
            self._changed()
        elif isinstance(msg, LoadFailed):
            self._loading.pop(msg.key, None)
            state = self.models.setdefault(msg.key, ModelState())
            state.state, state.reason = "failed", msg.reason
            log.error("model %s failed to load on %s: %s", msg.key, self.config.partition, msg.reason)
            self._changed()
        elif isinstance(msg, Ready):
            self.state = "ready"
            self.pid = msg.pid
            self.threads = msg.threads
            self.executors = msg.executors
            self.alone_threads = msg.alone_threads
            self._changed()

    def _on_exit(self, gen: int, exitcode: int | None) -> None:
        if gen != self._generation or self._stopping:
            return
        reason = self._kill_reason or f"worker exited unexpectedly (exit code {exitcode})"
        for culprit in self._kill_culprits if self._kill_reason else self._culprits():
            self._strike(culprit, reason)
        self._fail_pending(reason)
        self.restarts += 1
        self.last_restart_reason = reason
        self.state = "restarting"
        self._conn = None
        if time.monotonic() - self._started_at > HEALTHY_RESET_S:
            self._failures = 0
        self._failures += 1
        delay = self._backoff.delay(self._failures)
        log.error("worker %s lost: %s; restarting in %.1f s (restart #%d)", self.config.partition, reason, delay,
                  self.restarts)
        self._on_restart(reason)
        self._changed()
        assert self._loop is not None
        self._restart_handle = self._loop.call_later(delay, self._spawn)

    def _running(self) -> dict[int, str]:
        """Job id -> the model each executor is running (not decoding, not idle), from the shared markers."""
        running: dict[int, str] = {}
        if self._current is None:
            return running
        for slot in range(self.config.executors):
            job_id, index = int(self._current[2 * slot]), int(self._current[2 * slot + 1])
            pending = self._pending.get(job_id)
            if pending is not None and 0 <= index < len(pending.job.models):
                running[job_id] = pending.job.models[index]
        return running

    def _loading_now(self) -> str | None:
        """The model the worker is loading (loads run one at a time, in the order sent), or None."""
        if self._current is None or not int(self._current[-1]) or not self._loading:
            return None
        return min(self._loading, key=self._loading.__getitem__)

    def _culprits(self) -> list[str]:
        """The models that were running when the worker died; else the one loading; else none (idle or decoding).

        Two executors running two different models when the process crashed both get a strike; a strike is
        cleared by the model's next good result, so an innocent model is not quarantined by a neighbour.
        """
        running = sorted(set(self._running().values()))
        if running:
            return running
        loading = self._loading_now()
        return [loading] if loading else []

    def _strike(self, key: str, reason: str) -> None:
        state = self.models.get(key)
        if state is None:
            return
        state.strikes += 1
        if state.strikes >= self._settings.strikes_before_quarantine:
            state.state = "quarantined"
            state.reason = f"quarantined after {state.strikes} failures in a row (last: {reason})"
            log.error("model %s %s; reinstall it or restart the daemon to try again", key, state.reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(WorkerLost(reason))

    async def _watch(self) -> None:
        limit = self._settings.inference_timeout_s
        load_limit = self._settings.load_timeout_s
        while True:
            await asyncio.sleep(min(WATCHDOG_INTERVAL_S, limit / 4, load_limit / 4))
            if self._kill_reason is not None or self._proc is None:
                continue
            if self._loading:
                key = min(self._loading, key=self._loading.__getitem__)
                age = time.monotonic() - self._loading[key]
                if age > load_limit:
                    self._kill([key], f"loading {key} took {age:.1f} s (limit {load_limit:g} s); worker killed")
                    continue
            if not self._pending:
                continue
            oldest = min(self._pending.values(), key=lambda p: p.sent)
            age = time.monotonic() - oldest.sent
            if age > limit:
                # the oldest job is the one stuck: its executor's marker names the model it is in
                culprit = self._running().get(oldest.job.job_id)
                models = culprit or ", ".join(oldest.job.models)
                self._kill([culprit] if culprit else [],
                           f"inference on {models} ran {age:.1f} s (limit {limit:g} s); worker killed")

    def _kill(self, culprits: list[str], reason: str) -> None:
        self._kill_reason, self._kill_culprits = reason, culprits
        log.error("worker %s stuck: %s", self.config.partition, reason)
        if self._proc is not None:
            self._proc.kill()
