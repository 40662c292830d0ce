"""From ingest to events: per-partition lanes with fair dispatch, rules on the results, events out.

Each partition is a *lane*: its worker, latest-wins slots per source and a dispatcher that takes one
item at a time in round-robin order over sources whenever the worker has room (on the event loop, when
a message arrives or the worker's capacity or state changes; no task per frame). So a busy camera cannot
starve the others, nothing queues without bound, and under overload older frames are dropped and
counted. A message whose apps run in several partitions goes into each of their lanes; a *ticket*
settles it exactly once (processed if any lane served it), so ``received = processed + skipped +
rejected`` holds per source.

A new model version for an app is loaded beside the old one in the same partition; the app switches
to it only once it is loaded and warmed up, and the old version is unloaded after the jobs already
handed to the worker, so a swap loses no frame and fails no inference.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from appliance.events import EventSink
from appliance.ingest.client import topic_matches
from appliance.ingest.ingest import Frame
from appliance.ingest.slots import LatestSlots
from appliance.logs import ThrottledLog
from appliance.metrics import Metrics
from appliance.rules import Firing, RuleEngine
from appliance.runtime.messages import JobDone, ModelSpec
from appliance.runtime.results import Detection
from appliance.runtime.supervisor import WorkerLost, WorkerSupervisor
from appliance.stats import Stats
from appliance.status import AppState, AppStatus
from appliance.store import AppRecord, ModelRecord
from formats import AppManifest

log = logging.getLogger(__name__)

Outcome = Literal["processed", "skipped", "rejected"]

STOP_DRAIN_S = 5.0  # at stop, how long the frames already in the workers get to finish


@dataclass(slots=True)
class ActiveApp:
    manifest: AppManifest
    engine: RuleEngine
    enabled: bool
    spec: ModelSpec | None  # None: the model is not installed

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def model_key(self) -> str:
        return self.manifest.model.key


@dataclass(slots=True)
class Ticket:
    """One received message on its way through ``remaining`` lanes."""

    frame: Frame
    remaining: int
    processed: bool = False
    skipped: bool = False
    rejection: tuple[str, str] | None = None


@dataclass
class Lane:
    """One partition: its worker and its slots."""

    name: str
    worker: WorkerSupervisor
    slots: LatestSlots[Ticket] = field(default_factory=LatestSlots)
    wake_lock: threading.Lock = field(default_factory=threading.Lock)
    wake_scheduled: bool = False
    dispatched: int = 0


ROUTE_CACHE_MAX = 4096  # topics remembered per routing table; a flood of new topics only costs a recompute


class Routes:
    """Which apps listen to a topic: the filters of the enabled apps, with the answer cached per topic.

    Replaced whole on every reload, so a reader on another thread sees one table and its own cache.
    """

    def __init__(self, routes: tuple[tuple[str, str], ...] = ()) -> None:
        self._routes = routes  # (topic filter, app name)
        self._cache: dict[str, tuple[str, ...]] = {}

    def apps(self, topic: str) -> tuple[str, ...]:
        apps = self._cache.get(topic)
        if apps is None:
            apps = tuple(sorted({name for f, name in self._routes if topic_matches(f, topic)}))
            if len(self._cache) >= ROUTE_CACHE_MAX:
                self._cache.clear()
            self._cache[topic] = apps
        return apps


class Pipeline:
    def __init__(self, workers: dict[str, WorkerSupervisor], events: EventSink, stats: Stats,
                 metrics: Metrics, telemetry_slots: int = 16,
                 publish_result: Callable[[dict[str, object]], None] | None = None,
                 on_result: Callable[[AppManifest, Frame, list[Detection]], None] | None = None) -> None:
        self._publish_result = publish_result  # every result, when outputs.results is on
        self._on_result = on_result  # every result, for the hard-sample policy
        self._telemetry_slots = telemetry_slots  # samples kept per sensor while its lane is busy
        self.lanes = {name: Lane(name, w) for name, w in workers.items()}
        self._events = events
        self._stats = stats
        self._metrics = metrics
        self._apps: dict[str, ActiveApp] = {}
        self._incoming: dict[str, ActiveApp] = {}  # apps waiting for their new model version to load
        self.swap_notes: dict[str, str] = {}  # app -> what happened to its last swap
        self._routes = Routes()  # swapped whole, read from any thread
        self._placement: dict[str, str] = {}  # app -> partition; swapped whole
        self.unplaced: dict[str, str] = {}  # app -> why it is not placed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticket_lock = threading.Lock()
        self._inflight: set[asyncio.Future[JobDone]] = set()  # jobs in the workers
        self._emitting: set[asyncio.Task[None]] = set()  # events being stored and published
        self._log = ThrottledLog(log)

    # routing, safe from any thread

    def accepts(self, topic: str) -> bool:
        return bool(self._routes.apps(topic))

    def _apps_for(self, topic: str) -> tuple[str, ...]:
        return self._routes.apps(topic)

    def offer(self, frame: Frame) -> None:
        """Hand a received message to the lanes of the partitions its apps run in (any thread)."""
        placement = self._placement
        lanes = sorted({placement[a] for a in self._apps_for(frame.topic) if a in placement})
        if not lanes:
            why = "; ".join(f"{a}: {self.unplaced.get(a, 'not placed')}" for a in self._apps_for(frame.topic))
            self._reject(frame, "not_placed", f"no partition serves its apps ({why})")
            return
        ticket = Ticket(frame, remaining=len(lanes))
        for name in lanes:
            lane = self.lanes[name]
            dropped = lane.slots.put(frame.source, ticket, 1 if frame.kind == "camera" else self._telemetry_slots)
            if dropped is not None:
                self._settle(dropped, "skipped")
            self._wake_threadsafe(lane)

    # configuration

    def reload(self, apps: list[AppRecord], models: list[ModelRecord], placement: dict[str, str],
               unplaced: dict[str, str]) -> None:
        """Serve exactly these apps in these partitions; an app whose model changes is swapped without a gap."""
        by_key = {m.key: m for m in models}
        serving: dict[str, ActiveApp] = {}
        incoming: dict[str, ActiveApp] = {}
        for rec in apps:
            manifest = AppManifest.parse(rec.manifest_json.encode(), f"app {rec.name}")
            m = by_key.get(manifest.model.key)
            spec = ModelSpec(manifest.model.key, m.path, m.sha256, m.card_json) if m else None
            old = self._apps.get(rec.name)
            if old is not None and old.manifest == manifest:
                old.enabled, old.spec = rec.enabled, spec
                serving[rec.name] = old
                continue
            engine = old.engine.successor(manifest) if old is not None else RuleEngine(manifest)
            new = ActiveApp(manifest, engine, rec.enabled, spec)
            pending = self._incoming.get(rec.name)
            if pending is not None and pending.manifest == manifest:
                new = pending
            if (old is not None and old.enabled and rec.enabled and old.model_key != new.model_key
                    and self._model_state(old) == "ready" and placement.get(rec.name) == self._placement.get(rec.name)):
                serving[rec.name] = old  # keeps serving until the new version is ready
                incoming[rec.name] = new
                self.swap_notes[rec.name] = f"loading {new.model_key} beside {old.model_key}"
                log.info("app %s: loading %s beside %s for a hot swap", rec.name, new.model_key, old.model_key)
            else:
                serving[rec.name] = new
        self._apps, self._incoming = serving, incoming
        self._placement = {a: p for a, p in placement.items() if a in serving and serving[a].enabled}
        self.unplaced = dict(unplaced)
        self._routes = Routes(tuple((f, a.name) for a in serving.values() if a.enabled for f in a.manifest.sources))
        self._apply_models()
        log.info("serving %d app(s): %s", len(self._placement),
                 ", ".join(f"{a.manifest.key} on {self._placement.get(a.name, '-')}"
                           f"{'' if a.enabled else ' (disabled)'}" for a in serving.values()) or "none")

    def _apply_models(self) -> None:
        wanted: dict[str, dict[str, ModelSpec]] = {name: {} for name in self.lanes}
        for group in (self._apps, self._incoming):
            for app in group.values():
                lane = self._placement.get(app.name)
                if app.enabled and app.spec is not None and lane in wanted:
                    wanted[lane][app.model_key] = app.spec
        for name, specs in wanted.items():
            self.lanes[name].worker.set_models(specs)

    def _model_state(self, app: ActiveApp) -> str:
        lane = self.lanes.get(self._placement.get(app.name, ""))
        state = lane.worker.models.get(app.model_key) if lane else None
        return state.state if state else "absent"

    def on_worker_change(self, partition: str) -> None:
        """A worker's state or capacity changed (event loop): finish swaps, dispatch."""
        if self._incoming:
            self._advance_swaps()
        lane = self.lanes.get(partition)
        if lane is not None:
            self._pump(lane)

    def _advance_swaps(self) -> None:
        changed = False
        for name, new in list(self._incoming.items()):
            old = self._apps[name]
            state = self._model_state(new)
            if state == "ready":
                self._apps[name] = new
                del self._incoming[name]
                self.swap_notes[name] = f"swapped {old.model_key} -> {new.model_key} at {time.strftime('%H:%M:%S')}"
                log.info("app %s now runs %s (was %s)", name, new.model_key, old.model_key)
                changed = True
            elif state in ("failed", "quarantined"):
                del self._incoming[name]
                lane = self.lanes[self._placement[name]]
                reason = lane.worker.models[new.model_key].reason
                self.swap_notes[name] = f"swap to {new.model_key} failed ({reason}); still running {old.model_key}"
                log.error("app %s: %s", name, self.swap_notes[name])
                changed = True
        if changed:
            self._apply_models()

    def app_status(self) -> list[AppStatus]:
        """Each app's state in words, as status shows it."""
        out: list[AppStatus] = []
        events = self._stats.event_counts()
        for app in self._apps.values():
            partition = self._placement.get(app.name)
            lane = self.lanes.get(partition or "")
            model = lane.worker.models.get(app.model_key) if lane else None
            state: AppState
            if not app.enabled:
                state, reason = "disabled", "disabled by an operator"
            elif lane is None:
                state, reason = "not placed", self.unplaced.get(app.name, "no partition")
            elif app.spec is None:
                state, reason = "degraded", f"model {app.model_key} is not installed"
            elif lane.worker.state != "ready":
                state, reason = "degraded", f"worker {lane.name} is {lane.worker.state}"
            elif model is None or model.state != "ready":
                what = model.state if model else "not loaded"
                state, reason = "degraded", f"model {app.model_key} is {what}" + (
                    f": {model.reason}" if model and model.reason else "")
            else:
                state, reason = "serving", ""
            out.append(AppStatus(name=app.name, version=app.manifest.version, model=app.model_key,
                                 partition=partition, sources=tuple(app.manifest.sources), state=state,
                                 reason=reason, swap=self.swap_notes.get(app.name, ""),
                                 events=events.get(app.name, 0)))
        return out

    def lane_load(self, partition: str) -> tuple[int, int]:
        """(jobs handed to the partition's worker so far, items waiting in its slots), for ``/metrics``."""
        lane = self.lanes.get(partition)
        return (lane.dispatched, len(lane.slots)) if lane is not None else (0, 0)

    # lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for lane in self.lanes.values():
            self._pump(lane)

    async def stop(self) -> None:
        """Stop dispatching; let the jobs already in the workers finish and their events be stored (for a while)."""
        self._loop = None
        deadline = time.monotonic() + STOP_DRAIN_S
        while (waiting := self._inflight | self._emitting) and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(waiting, timeout=left)

    def _wake_threadsafe(self, lane: Lane) -> None:
        """Ask a lane's dispatcher to look at its slots; coalesced, so a flood makes one wake-up."""
        loop = self._loop
        if loop is None:
            return
        with lane.wake_lock:
            if lane.wake_scheduled:
                return
            lane.wake_scheduled = True
        loop.call_soon_threadsafe(self._woken, lane)

    def _woken(self, lane: Lane) -> None:
        with lane.wake_lock:
            lane.wake_scheduled = False
        self._pump(lane)

    def _pump(self, lane: Lane) -> None:
        """Hand the worker as many items as it has room for, round-robin over sources (event loop)."""
        if self._loop is None:
            return
        while lane.worker.capacity() > 0:
            item = lane.slots.take()
            if item is None:
                break
            self._dispatch(lane, item[1])

    # one item

    def _reject(self, frame: Frame, reason: str, detail: str) -> None:
        self._stats.rejected(frame.source, frame.kind, reason, detail)
        self._log.warning((frame.source, reason), "%s %s rejected (%s): %s", frame.kind, frame.source, reason, detail)

    def _settle(self, ticket: Ticket, outcome: Outcome, reason: tuple[str, str] | None = None) -> None:
        with self._ticket_lock:
            ticket.remaining -= 1
            if outcome == "processed":
                ticket.processed = True
            elif outcome == "rejected" and ticket.rejection is None:
                ticket.rejection = reason
            done = ticket.remaining == 0
        if not done:
            return
        frame = ticket.frame
        if ticket.processed:
            self._stats.processed(frame.source, frame.kind)
        elif ticket.rejection is not None:
            self._reject(frame, *ticket.rejection)
        else:
            self._stats.skipped(frame.source, frame.kind)

    def _dispatch(self, lane: Lane, ticket: Ticket) -> None:
        frame = ticket.frame
        placement = self._placement
        apps = [self._apps[a] for a in self._apps_for(frame.topic) if placement.get(a) == lane.name and a in self._apps]
        ready = lane.worker.ready_models()
        models = tuple(sorted({a.model_key for a in apps if a.model_key in ready}))
        if not models:
            states = {s.name: s for s in self.app_status()}
            why = "; ".join(f"{a.name}: {states[a.name].reason}" for a in apps if a.name in states)
            self._settle(ticket, "rejected", ("model_unavailable", why or "no app serves it any more"))
            return
        if frame.kind == "camera":
            fut = lane.worker.submit_image(models, frame.data)
        else:
            fut = lane.worker.submit_vector(models, frame.values or {})
        lane.dispatched += 1
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        fut.add_done_callback(lambda f: self._complete(ticket, apps, f))

    def _complete(self, ticket: Ticket, apps: list[ActiveApp], fut: asyncio.Future[JobDone]) -> None:
        frame = ticket.frame
        try:
            done = fut.result()
        except WorkerLost as e:
            self._settle(ticket, "rejected", ("worker_lost", str(e)))
            return
        if done.rejected is not None:
            self._settle(ticket, "rejected", done.rejected)
            return
        if not done.results:
            self._settle(ticket, "rejected", ("inference_error", "; ".join(f"{k}: {v}" for k, v in done.errors.items())))
            return
        for key, err in done.errors.items():
            self._log.warning((frame.source, key), "model %s failed on %s %s: %s", key, frame.kind, frame.source, err)
        self._settle(ticket, "processed")
        if frame.kind == "camera":
            self._metrics.decode.observe(done.decode_s)
        for key, seconds in done.infer_s.items():
            self._metrics.inference.labels(key).observe(seconds)
        for key, size in done.batch.items():
            self._metrics.batch.labels(key).observe(size)
        if done.alone:
            self._metrics.alone.inc()
        now = time.time()
        self._metrics.pipeline.labels(frame.kind).observe(now - frame.arrived)
        self._metrics.frame_age.labels(frame.kind).observe(max(0.0, now - frame.captured))
        for app in apps:
            detections = done.results.get(app.model_key)
            if detections is None:
                continue
            self._stats.result(frame.source, frame.captured, app.name, tuple(detections))
            if self._publish_result is not None:
                result = {"source": frame.source, "app": app.name, "model": app.model_key,
                          "ts": frame.captured, "arrived": frame.arrived, "done": now,
                          # decode + preprocess + inference + outputs of this frame for this model
                          "work_s": round(done.decode_s + done.prepare_s.get(app.model_key, 0.0)
                                          + done.infer_s.get(app.model_key, 0.0), 6),
                          "detections": [d.to_json() for d in detections]}
                self._metrics.side_work.run("results", app.name, self._publish_result, result)
            if self._on_result is not None:
                self._metrics.side_work.run("samples", app.name, self._on_result, app.manifest, frame, detections)
            firings = app.engine.evaluate(frame.source, detections, frame.captured)
            if firings:
                task = asyncio.create_task(self._emit(app.name, firings, frame, detections))
                self._emitting.add(task)
                task.add_done_callback(self._emitting.discard)

    async def _emit(self, app: str, firings: list[Firing], frame: Frame, detections: list[Detection]) -> None:
        for firing in firings:
            try:
                await self._events.emit(firing, frame, detections)
            except Exception:  # an event that cannot be stored must not stop the pipeline
                log.exception("could not record the event of app %s on %s", app, frame.source)
                continue
            self._stats.event(app)

