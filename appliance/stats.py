"""Per-source counters and rates, the one record behind ``appliance status`` and ``/metrics``.

Every frame or sample received ends up in exactly one of processed, skipped (replaced by a newer one
before it was served) or rejected (with a reason), so ``received = processed + skipped + rejected``
once the in-flight ones are done. Updated from the MQTT thread and the event loop: guarded by a lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["camera", "sensor"]

RATE_WINDOW_S = 10  # fps are averaged over this many seconds
UNKNOWN_SOURCES_KEPT = 64  # distinct unknown source ids remembered for status (oldest forgotten)
TREND_SAMPLES = 120  # telemetry samples kept per sensor for the console's trend chart

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
class SourceStats:
    id: str
    kind: SourceKind
    received: int = 0
    processed: int = 0
    skipped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    last_seen: float = 0.0
    last_reject: tuple[float, str, str] | None = None  # ts, reason, detail
    last_values: dict[str, float] = field(default_factory=dict)
    last_frame: tuple[float, bytes] | None = None  # camera: when, and the encoded image (for the console)
    trend: deque[tuple[float, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=TREND_SAMPLES))
    rx: RateMeter = field(default_factory=RateMeter)
    px: RateMeter = field(default_factory=RateMeter)
    sx: RateMeter = field(default_factory=RateMeter)


class Stats:
    def __init__(self, silent_after_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, SourceStats] = {}
        self.unknown: OrderedDict[str, tuple[float, int]] = OrderedDict()  # id -> (last seen, count)
        self.unknown_total: Counter[str] = Counter()  # reason -> count, for messages with no known source
        self.events: Counter[str] = Counter()  # app -> events
        self.silent_after_s = silent_after_s

    def _get(self, source: str, kind: SourceKind) -> SourceStats:
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = SourceStats(source, kind)
        return s

    def received(self, source: str, kind: SourceKind, now: float) -> None:
        with self._lock:
            s = self._get(source, kind)
            s.received += 1
            s.last_seen = now
            s.rx.add(now)

    def processed(self, source: str, kind: SourceKind, n: int = 1) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind)
            s.processed += n
            s.px.add(now, n)

    def skipped(self, source: str, kind: SourceKind, n: int = 1) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind)
            s.skipped += n
            s.sx.add(now, n)

    def rejected(self, source: str, kind: SourceKind, reason: str, detail: str) -> None:
        now = time.time()
        with self._lock:
            s = self._get(source, kind)
            s.rejected[reason] += 1
            s.last_reject = (now, reason, detail)

    def unknown_source(self, source: str, reason: str, now: float) -> bool:
        """Count a message from a source no app listens to; True the first time this id is seen."""
        with self._lock:
            self.unknown_total[reason] += 1
            seen = self.unknown.pop(source, None)
            self.unknown[source] = (now, (seen[1] if seen else 0) + 1)
            while len(self.unknown) > UNKNOWN_SOURCES_KEPT:
                self.unknown.popitem(last=False)
            return seen is None

    def values(self, source: str, values: dict[str, float], now: float) -> None:
        with self._lock:
            s = self._get(source, "sensor")
            s.last_values = dict(values)
            s.trend.append((now, s.last_values))

    def frame(self, source: str, data: bytes, now: float) -> None:
        """Keep a camera's latest accepted frame (one per camera), for the console's Sources page."""
        with self._lock:
            self._get(source, "camera").last_frame = (now, data)

    def last_frame(self, source: str) -> tuple[float, bytes] | None:
        with self._lock:
            s = self._sources.get(source)
            return s.last_frame if s is not None else None

    def trend(self, source: str) -> Trend:
        """The sensor's recent samples, oldest first."""
        with self._lock:
            s = self._sources.get(source)
            return list(s.trend) if s is not None else []

    def event(self, app: str) -> None:
        with self._lock:
            self.events[app] += 1

    def forget(self, source: str) -> None:
        with self._lock:
            self._sources.pop(source, None)

    def snapshot(self) -> list[dict[str, object]]:
        """A JSON-ready view of every source, with its state in words."""
        now = time.time()
        out: list[dict[str, object]] = []
        with self._lock:
            for s in sorted(self._sources.values(), key=lambda s: s.id):
                state, why = "receiving", ""
                if not s.last_seen or now - s.last_seen > self.silent_after_s:
                    state, why = "silent", (f"no data for more than {self.silent_after_s:g} s" if s.last_seen
                                                    else "no data yet")
                elif s.last_reject and now - s.last_reject[0] < RATE_WINDOW_S and s.px.rate(now) == 0:
                    state, why = "rejecting", f"{s.last_reject[1]}: {s.last_reject[2]}"
                out.append({
                    "id": s.id,
                    "kind": s.kind,
                    "state": state,
                    "reason": why,
                    "received": s.received,
                    "processed": s.processed,
                    "skipped": s.skipped,
                    "rejected": dict(s.rejected),
                    "fps_received": round(s.rx.rate(now), 2),
                    "fps_processed": round(s.px.rate(now), 2),
                    "fps_skipped": round(s.sx.rate(now), 2),
                    "last_seen": s.last_seen or None,
                    "last_reject": None if s.last_reject is None else {
                        "ts": s.last_reject[0], "reason": s.last_reject[1], "detail": s.last_reject[2]},
                    "last_values": dict(s.last_values),
                })
        return out

    def counts(self) -> list[tuple[str, str, int, int, int, dict[str, int]]]:
        with self._lock:
            return [(s.id, s.kind, s.received, s.processed, s.skipped, dict(s.rejected))
                    for s in self._sources.values()]

    def unknown_snapshot(self) -> tuple[dict[str, int], list[dict[str, object]]]:
        with self._lock:
            return dict(self.unknown_total), [
                {"id": k, "last_seen": v[0], "count": v[1]} for k, v in self.unknown.items()]

    def events_snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.events)
