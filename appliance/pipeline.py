"""From slots to events: fair dispatch to the partition worker, rules on the results, events out.

The dispatcher takes one pending item at a time in round-robin order over sources (see
:mod:`appliance.ingest.slots`) whenever the worker has room, so a busy camera cannot starve the
others and nothing queues without bound: under overload, frames wait in their latest-wins slot and
older ones are dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from appliance.events import EventSink
from appliance.ingest.client import topic_matches
from appliance.ingest.ingest import Frame
from appliance.ingest.slots import LatestSlots
from appliance.logs import ThrottledLog
from appliance.metrics import Metrics
from appliance.rules import RuleEngine
from appliance.runtime.messages import JobDone, ModelSpec
from appliance.runtime.results import Detection
from appliance.runtime.supervisor import WorkerLost, WorkerSupervisor
from appliance.stats import Stats
from appliance.store import AppRecord, ModelRecord
from formats import AppManifest

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ActiveApp:
    manifest: AppManifest
    engine: RuleEngine
    enabled: bool

    @property
    def model_key(self) -> str:
        return self.manifest.model.key


@dataclass(slots=True, frozen=True)
class LastResult:
    ts: float
    app: str
    detections: tuple[Detection, ...]


class Pipeline:
    def __init__(
        self,
        slots: LatestSlots[Frame],
        worker: WorkerSupervisor,
        events: EventSink,
        stats: Stats,
        metrics: Metrics,
    ) -> None:
        self._slots = slots
        self._worker = worker
        self._events = events
        self._stats = stats
        self._metrics = metrics
        self._apps: dict[str, ActiveApp] = {}
        self._routes: tuple[tuple[str, str], ...] = ()  # (topic filter, app name); swapped whole, read anywhere
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event = asyncio.Event()
        self._wake_lock = threading.Lock()
        self._wake_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.last_results: dict[str, LastResult] = {}
        self._log = ThrottledLog(log)

    # routing, safe from any thread

    def accepts(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f, _ in self._routes)

    def _apps_for(self, topic: str) -> list[ActiveApp]:
        names = {name for f, name in self._routes if topic_matches(f, topic)}
        return [self._apps[n] for n in sorted(names) if n in self._apps]

    # configuration

    def reload(self, apps: list[AppRecord], models: list[ModelRecord]) -> None:
        """Serve exactly these apps: load their models in the worker and route their sources."""
        by_key = {f"{m.name}@{m.version}": m for m in models}
        active: dict[str, ActiveApp] = {}
        for rec in apps:
            manifest = AppManifest.parse(rec.manifest_json.encode(), f"app {rec.name}")
            old = self._apps.get(rec.name)
            engine = old.engine if old is not None and old.manifest == manifest else RuleEngine(manifest)
            active[rec.name] = ActiveApp(manifest, engine, rec.enabled)
        specs: dict[str, ModelSpec] = {}
        for app in active.values():
            m = by_key.get(app.model_key)
            if app.enabled and m is not None:
                specs[app.model_key] = ModelSpec(app.model_key, m.path, m.sha256, m.card_json)
        self._worker.set_models(specs)
        self._apps = active
        self._routes = tuple((f, a.manifest.name) for a in active.values() if a.enabled for f in a.manifest.sources)
        log.info("serving %d app(s): %s", sum(a.enabled for a in active.values()),
                 ", ".join(f"{a.manifest.key}{'' if a.enabled else ' (disabled)'}" for a in active.values()) or "none")

    def app_states(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for app in self._apps.values():
            model = self._worker.models.get(app.model_key)
            if not app.enabled:
                state, reason = "disabled", "disabled by an operator"
            elif self._worker.state != "ready":
                state, reason = "degraded", f"worker {self._worker.config.partition} is {self._worker.state}"
            elif model is None:
                state, reason = "degraded", f"model {app.model_key} is not installed"
            elif model.state != "ready":
                state, reason = "degraded", f"model {app.model_key} is {model.state}" + (
                    f": {model.reason}" if model.reason else "")
            else:
                state, reason = "serving", ""
            out.append({"name": app.manifest.name, "version": app.manifest.version, "model": app.model_key,
                        "sources": list(app.manifest.sources), "state": state, "reason": reason,
                        "events": self._stats.events_snapshot().get(app.manifest.name, 0)})
        return out

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="dispatcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=5)

    def wake_threadsafe(self) -> None:
        """Ask the dispatcher to look at the slots; coalesced, so a flood makes one wake-up."""
        loop = self._loop
        if loop is None:
            return
        with self._wake_lock:
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        with self._wake_lock:
            self._wake_scheduled = False
        self._event.set()

    def wake(self) -> None:
        """From the event loop."""
        self._event.set()

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            while self._worker.capacity() > 0:
                item = self._slots.take()
                if item is None:
                    break
                self._dispatch(item[1])

    # one item

    def _reject(self, frame: Frame, reason: str, detail: str) -> None:
        self._stats.rejected(frame.source, frame.kind, reason, detail)
        self._log.warning((frame.source, reason), "%s %s rejected (%s): %s", frame.kind, frame.source, reason, detail)

    def _dispatch(self, frame: Frame) -> None:
        apps = [a for a in self._apps_for(frame.topic) if a.enabled]
        ready = self._worker.ready_models()
        models = tuple(sorted({a.model_key for a in apps if a.model_key in ready}))
        if not models:
            why = "; ".join(f"{s['model']}: {s['reason']}" for s in self.app_states()
                            if s["name"] in {a.manifest.name for a in apps}) or "no app serves it any more"
            self._reject(frame, "model_unavailable", why)
            return
        if frame.kind == "camera":
            fut = self._worker.submit_image(models, frame.data)
        else:
            fut = self._worker.submit_vector(models, frame.values or {})
        task = asyncio.create_task(self._complete(frame, apps, fut))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _complete(self, frame: Frame, apps: list[ActiveApp], fut: asyncio.Future[JobDone]) -> None:
        try:
            done = await fut
        except WorkerLost as e:
            self._reject(frame, "worker_lost", str(e))
            return
        if done.rejected is not None:
            self._reject(frame, *done.rejected)
            return
        if not done.results:
            self._reject(frame, "inference_error", "; ".join(f"{k}: {v}" for k, v in done.errors.items()))
            return
        for key, err in done.errors.items():
            self._log.warning((frame.source, key), "model %s failed on %s %s: %s", key, frame.kind, frame.source, err)
        self._stats.processed(frame.source, frame.kind)
        if frame.kind == "camera":
            self._metrics.decode.observe(done.decode_s)
        for key, seconds in done.infer_s.items():
            self._metrics.inference.labels(key).observe(seconds)
        self._metrics.pipeline.labels(frame.kind).observe(time.time() - frame.arrived)
        for app in apps:
            detections = done.results.get(app.model_key)
            if detections is None:
                continue
            self.last_results[frame.source] = LastResult(frame.captured, app.manifest.name, tuple(detections))
            for firing in app.engine.evaluate(frame.source, detections, frame.captured):
                try:
                    await self._events.emit(firing, frame, detections)
                except Exception:  # an event that cannot be stored must not stop the pipeline
                    log.exception("could not record the event of app %s on %s", app.manifest.name, frame.source)
                    continue
                self._stats.event(app.manifest.name)
