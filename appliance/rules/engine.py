"""Turn per-frame detections into events, following an app manifest's rules.

One :class:`RuleEngine` per app. Call :meth:`RuleEngine.evaluate` once for every processed frame (or
telemetry sample) of a source, with that sample's timestamp; it returns the rules that fire::

    engine = RuleEngine(manifest)
    for firing in engine.evaluate("cameras/cam1/frame", detections, ts=time.time()):
        store_event(firing)
    ...
    engine.forget("cameras/cam1/frame")  # the source went away: drop its state

A frame *matches* a rule when at least one detection has a label in ``rule.labels`` (empty: any
label), ``score >= rule.min_score`` and, if the rule has a zone, a box whose centre lies inside the
zone (edges included). A detection without a box (classification, telemetry) never matches a rule
with a zone: there is no location to test, and firing a zone rule on an unlocated result would be a
false alarm.

A rule fires for a source when the current frame matches, at least ``debounce.n`` of the last
``debounce.m`` frames of that source matched (the current one included), and the rule has not fired
for that source within the last ``cooldown_s`` seconds. Time is the ``ts`` passed in, never the wall
clock; a ``ts`` more than ``cooldown_s`` *before* the last firing (the clock stepped back) also ends
the cool-down. Frames suppressed by the cool-down still count towards the debounce window.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from appliance.runtime.results import Detection
from formats.app_manifest import AppManifest, Rule

__all__ = ["Firing", "RuleEngine", "point_in_polygon"]

# How close (in normalised frame units) a point must be to a zone edge to count as on it.
EDGE_TOLERANCE = 1e-9


@dataclass(slots=True, frozen=True)
class Firing:
    """One rule firing for one source: the raw material of an event."""

    app: str
    app_version: str
    rule: str
    source: str
    ts: float  # seconds, the timestamp passed to evaluate()
    detection: Detection  # the best (highest-score) matching detection
    detections: tuple[Detection, ...]  # every matching detection, in input order

    def to_json(self) -> dict[str, object]:
        return {
            "app": self.app,
            "app_version": self.app_version,
            "rule": self.rule,
            "source": self.source,
            "ts": self.ts,
            "detection": self.detection.to_json(),
            "detections": [d.to_json() for d in self.detections],
        }


@dataclass(slots=True)
class _RuleState:
    """Debounce window and cool-down clock of one rule for one source."""

    window: deque[bool]
    last_fired: float | None = None


@dataclass(slots=True)
class _SourceState:
    rules: list[_RuleState] = field(default_factory=list)


def point_in_polygon(x: float, y: float, polygon: Sequence[tuple[float, float]]) -> bool:
    """Whether ``(x, y)`` lies inside ``polygon`` (even-odd ray casting); points on an edge count as inside."""
    n = len(polygon)
    if n < 3:
        return False
    inside = False
    x2, y2 = polygon[-1]
    for x1, y1 in polygon:
        if _on_segment(x, y, x1, y1, x2, y2):
            return True
        # Half-open test on y so a ray through a vertex is counted once.
        if (y1 > y) != (y2 > y):
            x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < x_cross:
                inside = not inside
        x2, y2 = x1, y1
    return inside


def _on_segment(px: float, py: float, x1: float, y1: float, x2: float, y2: float) -> bool:
    cross = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
    if abs(cross) > EDGE_TOLERANCE * max(1.0, math.hypot(x2 - x1, y2 - y1)):
        return False
    return (
        min(x1, x2) - EDGE_TOLERANCE <= px <= max(x1, x2) + EDGE_TOLERANCE
        and min(y1, y2) - EDGE_TOLERANCE <= py <= max(y1, y2) + EDGE_TOLERANCE
    )


def _matches(rule: Rule, detection: Detection) -> bool:
    if rule.labels and detection.label not in rule.labels:
        return False
    if not detection.score >= rule.min_score:  # written so that a NaN score never matches
        return False
    if rule.zone is None:
        return True
    if detection.box is None:
        return False
    x1, y1, x2, y2 = detection.box
    return point_in_polygon((x1 + x2) / 2, (y1 + y2) / 2, rule.zone)


class RuleEngine:
    """Evaluates one app's rules, keeping debounce and cool-down state per (rule, source).

    State is bounded: per source, one ``deque(maxlen=m)`` and one timestamp per rule. Sources are
    tracked from their first :meth:`evaluate` until :meth:`forget`. Safe to call from several threads.
    """

    def __init__(self, manifest: AppManifest) -> None:
        self._manifest = manifest
        self._rules: tuple[Rule, ...] = tuple(manifest.rules)
        self._sources: dict[str, _SourceState] = {}
        self._lock = threading.Lock()

    @property
    def manifest(self) -> AppManifest:
        return self._manifest

    def successor(self, manifest: AppManifest) -> RuleEngine:
        """The engine for the app's next version. With the same rules, the debounce and cool-down state
        carries over (shared: the old engine stops being used at the swap), so upgrading only the model
        neither fires an alert again nor forgets one that is cooling down."""
        new = RuleEngine(manifest)
        if tuple(manifest.rules) == self._rules:
            new._sources, new._lock = self._sources, self._lock
        return new

    @property
    def tracked_sources(self) -> frozenset[str]:
        """Sources that currently hold state."""
        with self._lock:
            return frozenset(self._sources)

    def evaluate(self, source: str, detections: list[Detection], ts: float) -> list[Firing]:
        """Record one frame of ``source`` at time ``ts`` (seconds) and return the rules that fire, in manifest order."""
        if not math.isfinite(ts):
            raise ValueError(f"timestamp must be finite, got {ts!r}")
        firings: list[Firing] = []
        with self._lock:
            state = self._sources.get(source)
            if state is None:
                state = _SourceState([_RuleState(deque(maxlen=r.debounce.m)) for r in self._rules])
                self._sources[source] = state
            for rule, rule_state in zip(self._rules, state.rules, strict=True):
                matching = tuple(d for d in detections if _matches(rule, d))
                rule_state.window.append(bool(matching))
                if not matching or sum(rule_state.window) < rule.debounce.n:
                    continue
                # abs(): a small step back (jitter) stays suppressed, but a clock stepped back by more than the
                # cool-down must not silence the rule until it catches up again.
                if rule_state.last_fired is not None and abs(ts - rule_state.last_fired) < rule.cooldown_s:
                    continue
                rule_state.last_fired = ts
                best = max(matching, key=lambda d: d.score)
                firings.append(
                    Firing(
                        app=self._manifest.name,
                        app_version=self._manifest.version,
                        rule=rule.name,
                        source=source,
                        ts=ts,
                        detection=best,
                        detections=matching,
                    )
                )
        return firings

    def forget(self, source: str) -> None:
        """Drop all debounce and cool-down state of ``source``; unknown sources are ignored."""
        with self._lock:
            self._sources.pop(source, None)
