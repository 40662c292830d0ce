"""Per-source counters and rates, the one record behind ``appliance status`` and ``/metrics``.

Every frame or sample received ends up in exactly one of processed, skipped (replaced by a newer one
before it was served) or rejected (with a reason), so ``received = processed + skipped + rejected``
once the in-flight ones are done. Updated from the MQTT thread and the event loop: guarded by a lock.

What is kept is bounded, however many source ids come and go: the cameras' latest frames (for the
console) share a byte budget, the least recently updated let go first; a source silent for longer than
``forget_after_s`` is forgotten whole (counters, latest frame, trend, last result); and only the latest
``unknown_kept`` ids of sources no app listens to are remembered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from appliance.runtime.results import Detection
from appliance.status import (
    DetectionStatus,
    LastReject,
    LastResult,
    SourceKind,
    SourceState,
    SourceStatus,
    UnknownSource,
    UnknownSources,
)

__all__ = ["RATE_WINDOW_S", "RateMeter", "SourceKind", "Stats", "Trend"]

RATE_WINDOW_S = 10  # fps are averaged over this many seconds
TREND_SAMPLES = 120  # telemetry samples kept per sensor for the console's trend chart
LAST_RESULT_DETECTIONS = 5  # detections of a source's last result shown in status
# defaults of the bounds; the daemon takes them from [ingest] (appliance.settings.IngestSettings)
LATEST_FRAMES_BYTES = 64 * 1024 * 1024  # bytes, all cameras' latest frames together
FORGET_AFTER_S = 86400.0  # seconds of silence after which a source is forgotten
UNKNOWN_SOURCES_KEPT = 64  # distinct ids of sources no app listens to, remembered for status

Trend = list[tuple[float, dict[str, float]]]


class RateMeter:
    """Events per second over the last ``RATE_WINDOW_S`` whole seconds."""

    __slots__ = ("_buckets", "_stamps")

    def __init__(self) -> None:
        self._buckets = [0] * RATE_WINDOW_S
        self._stamps = [0] * RATE_WINDOW_S

    def add(self, now: float, n: int = 1) -> None:
        sec = int(now)
        i = sec % RATE_WINDOW_S
        if self._stamps[i] != sec:
            self._stamps[i], self._buckets[i] = sec, 0
        self._buckets[i] += n

    def rate(self, now: float) -> float:
        sec = int(now)
        total = sum(b for b, s in zip(self._buckets, self._stamps) if sec - RATE_WINDOW_S < s < sec)
        return total / (RATE_WINDOW_S - 1)


@dataclass
class _Source:
    id: str
    kind: SourceKind
    touched: float  # when it was created or last received: what forgetting goes by
    received: int = 0
    processed: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    last_seen: float = 0.0
    last_reject: tuple[float, str, str] | None = None  # ts, reason, detail
    last_values: dict[str, float] = field(default_factory=dict)
    last_result: tuple[float, str, tuple[Detection, ...]] | None = None  # capture time, app, detections
    trend: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=TREND_SAMPLES))
    rx: RateMeter = field(default_factory=RateMeter)
    px: RateMeter = field(default_factory=RateMeter)
    sx: RateMeter = field(default_factory=RateMeter)


class Stats:
    def __init__(self, silent_after_s: float = 30.0, *, latest_frames_bytes: int = LATEST_FRAMES_BYTES,
                 forget_after_s: float = FORGET_AFTER_S, unknown_kept: int = UNKNOWN_SOURCES_KEPT) -> None:
        self._lock = threading.Lock()
        self._sources: OrderedDict[str, _Source] = OrderedDict()  # least recently touched first
        self._frames: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # camera -> (when, image), oldest first
        self._frame_bytes = 0
        self._unknown: OrderedDict[str, tuple[float, int]] = OrderedDict()  # id -> (last seen, count)
        self._unknown_total: Counter[str] = Counter()  # reason -> count, for messages with no known source
        self._events: Counter[str] = Counter()  # app -> events
        self.silent_after_s = silent_after_s
        self.latest_frames_bytes = latest_frames_bytes
        self.forget_after_s = forget_after_s
        self.unknown_kept = unknown_kept

    def _get(self, source: str, kind: SourceKind, now: float) -> _Source:
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = _Source(source, kind, now)
        return s

    def _sweep(self, now: float) -> None:
        """Forget the sources silent for longer than ``forget_after_s`` (the lock is held)."""
        limit = now - self.forget_after_s
        while self._sources:
            oldest = next(iter(self._sources.values()))
            if oldest.touched >= limit:
                return
            self._drop(oldest.id)

    def _drop(self, source: str) -> None:
        self._sources.pop(source, None)
        frame = self._frames.pop(source, None)
        if frame is not None:
            self._frame_bytes -= len(frame[1])

    def received(self, source: str, kind: SourceKind, now: float) -> None:
        with self._lock:
            s = self._get(source, kind, now)
            s.received += 1
            s.last_seen = s.touched = max(s.touched, now)
            s.rx.add(now)
            self._sources.move_to_end(source)
            self._sweep(now)

    def processed(self, source: str, kind: SourceKind, n: int = 1) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind, now)
            s.processed += n
            s.px.add(now, n)

    def skipped(self, source: str, kind: SourceKind, n: int = 1) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind, now)
            s.skipped += n
            s.sx.add(now, n)

    def rejected(self, source: str, kind: SourceKind, reason: str, detail: str) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind, now)
            s.rejected[reason] += 1
            s.last_reject = (now, reason, detail)

    def unknown_source(self, source: str, reason: str, now: float) -> bool:
        """Count a message from a source no app listens to; True the first time this id is seen."""
        with self._lock:
            self._unknown_total[reason] += 1
            seen = self._unknown.pop(source, None)
            self._unknown[source] = (now, (seen[1] if seen else 0) + 1)
            while len(self._unknown) > self.unknown_kept:
                self._unknown.popitem(last=False)
            return seen is None

    def values(self, source: str, values: dict[str, float], now: float) -> None:
        with self._lock:
            s = self._get(source, "sensor", now)
            s.last_values = dict(values)
            s.trend.append((now, s.last_values))

    def frame(self, source: str, data: bytes, now: float) -> None:
        """Keep a camera's latest accepted frame, for the console's Sources page, within the byte budget: the
        frames updated longest ago are let go first, and a frame bigger than the whole budget is not kept."""
        with self._lock:
            self._get(source, "camera", now)
            old = self._frames.pop(source, None)
            if old is not None:
                self._frame_bytes -= len(old[1])
            if len(data) > self.latest_frames_bytes:
                return
            self._frames[source] = (now, data)
            self._frame_bytes += len(data)
            while self._frame_bytes > self.latest_frames_bytes:
                _, (_, dropped) = self._frames.popitem(last=False)
                self._frame_bytes -= len(dropped)

    def last_frame(self, source: str) -> tuple[float, bytes] | None:
        with self._lock:
            return self._frames.get(source)

    def frame_bytes(self) -> int:
        """Bytes held in the cameras' latest frames."""
        with self._lock:
            return self._frame_bytes

    def result(self, source: str, ts: float, app: str, detections: tuple[Detection, ...]) -> None:
        """Record an app's latest result on ``source`` (the event loop; kept raw, typed when status is read)."""
        with self._lock:
            s = self._sources.get(source)
            if s is not None:
                s.last_result = (ts, app, detections[:LAST_RESULT_DETECTIONS])

    def trend(self, source: str) -> Trend:
        """The sensor's recent samples, oldest first."""
        with self._lock:
            s = self._sources.get(source)
            return list(s.trend) if s is not None else []

    def event(self, app: str) -> None:
        with self._lock:
            self._events[app] += 1

    def forget(self, source: str) -> None:
        with self._lock:
            self._drop(source)

    def tracked(self) -> int:
        """How many sources are remembered."""
        with self._lock:
            self._sweep(time.time())
            return len(self._sources)

    def sources(self) -> list[SourceStatus]:
        """Every source remembered, by id, with its state in words."""
        now = time.time()
        with self._lock:
            self._sweep(now)
            found = sorted(self._sources.values(), key=lambda s: s.id)
            return [self._status(s, now) for s in found]

    def _status(self, s: _Source, now: float) -> SourceStatus:
        state: SourceState = "receiving"
        why = ""
        if not s.last_seen or now - s.last_seen > self.silent_after_s:
            state = "silent"
            why = f"no data for more than {self.silent_after_s:g} s" if s.last_seen else "no data yet"
        elif s.last_reject and now - s.last_reject[0] < RATE_WINDOW_S and s.px.rate(now) == 0:
            state, why = "rejecting", f"{s.last_reject[1]}: {s.last_reject[2]}"
        last = None
        if s.last_result is not None:
            ts, app, detections = s.last_result
            last = LastResult(ts=ts, app=app, detections=tuple(_detection(d) for d in detections))
        return SourceStatus(
            id=s.id, kind=s.kind, state=state, reason=why, received=s.received, processed=s.processed,
            skipped=s.skipped, rejected=dict(s.rejected), fps_received=round(s.rx.rate(now), 2),
            fps_processed=round(s.px.rate(now), 2), fps_skipped=round(s.sx.rate(now), 2),
            last_seen=s.last_seen or None,
            last_reject=None if s.last_reject is None else LastReject(
                ts=s.last_reject[0], reason=s.last_reject[1], detail=s.last_reject[2]),
            last_values=dict(s.last_values), last_result=last)

    def last_seen(self) -> list[tuple[str, SourceKind, float]]:
        """(id, kind, last seen) of every source that sent something, for the store."""
        with self._lock:
            return [(s.id, s.kind, s.last_seen) for s in self._sources.values() if s.last_seen]

    def counts(self) -> list[tuple[str, str, int, int, int, dict[str, int]]]:
        with self._lock:
            self._sweep(time.time())
            return [(s.id, s.kind, s.received, s.processed, s.skipped, dict(s.rejected))
                    for s in self._sources.values()]

    def unknown(self) -> UnknownSources:
        with self._lock:
            return UnknownSources(rejected=dict(self._unknown_total), recent=tuple(
                UnknownSource(id=k, last_seen=v[0], count=v[1]) for k, v in self._unknown.items()))

    def event_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._events)


def _detection(d: Detection) -> DetectionStatus:
    box = None if d.box is None else (round(d.box[0], 4), round(d.box[1], 4), round(d.box[2], 4), round(d.box[3], 4))
    return DetectionStatus(label=d.label, score=round(d.score, 4), box=box)
