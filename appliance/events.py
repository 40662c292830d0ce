"""Events out: a snapshot on disk, a row in the store, a JSON message on MQTT; and their retention.

Snapshots are written under a temporary name and renamed into place. Retention removes events older
than ``retention.max_age_days`` and then the oldest until the snapshots fit in
``retention.max_snapshot_bytes``, so an unattended box never fills its disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter

from appliance.ingest.ingest import Frame
from appliance.rules import Firing, draw_snapshot, render_telemetry_card
from appliance.runtime.results import Detection
from appliance.settings import Settings
from appliance.sidework import SideWork
from appliance.store import EventRecord, Store
from common.files import write_atomically

log = logging.getLogger(__name__)


def frame_file(snapshot: str) -> str:
    """Where an event's clean frame is kept, beside its snapshot (``x.jpg`` -> ``x.frame.jpg``)."""
    return snapshot[:-4] + ".frame.jpg" if snapshot.endswith(".jpg") else snapshot + ".frame"


def event_json(event: EventRecord, device: str) -> bytes:
    return json.dumps({
        "id": event.id,
        "device": device,
        "app": event.app,
        "source": event.source,
        "rule": event.rule,
        "label": event.label,
        "score": round(event.score, 4),
        "box": event.box,
        "ts": event.ts,
        "snapshot": event.snapshot,
    }).encode()


class EventSink:
    def __init__(self, store: Store, settings: Settings, publish: Callable[[str, bytes], object],
                 on_event: Callable[[EventRecord], None] = lambda event: None,
                 side_work: SideWork | None = None) -> None:
        self._store = store
        self._side = side_work or SideWork(Counter("side_work_errors", "", ["work"], registry=None))
        self._on_event = on_event  # the console's live feed
        self._settings = settings
        self._publish = publish
        self._topic = f"{settings.topics.appliance}/{settings.device_id}/events"

    async def emit(self, firing: Firing, frame: Frame, detections: list[Detection]) -> EventRecord:
        loop = asyncio.get_running_loop()
        event_id = uuid.uuid4().hex
        day = datetime.fromtimestamp(firing.ts, UTC).strftime("%Y-%m-%d")
        rel = f"snapshots/{day}/{event_id}.jpg"
        snapshot = await loop.run_in_executor(None, self._render, frame, detections, firing)
        size = 0
        if snapshot is not None:
            await loop.run_in_executor(None, write_atomically, self._settings.state_dir / rel, snapshot)
            size = len(snapshot)
            if frame.kind == "camera":
                # the clean frame too: an operator's "false positive" makes it a hard sample for retraining
                await loop.run_in_executor(None, write_atomically,
                                           self._settings.state_dir / frame_file(rel), frame.data)
                size += len(frame.data)
        d = firing.detection
        event = EventRecord(
            id=event_id, ts=firing.ts, app=firing.app, source=firing.source, rule=firing.rule, label=d.label,
            score=d.score, box=d.box, snapshot=rel if snapshot else None,
            snapshot_bytes=size, created=time.time())
        await loop.run_in_executor(None, self._store.events.add, event)
        # stored: the event exists; what follows only tells others, and cannot undo it
        self._side.run("events-mqtt", firing.app, self._publish, self._topic, event_json(event, self._settings.device_id))
        self._side.run("live", firing.app, self._on_event, event)
        log.info("event %s: app %s rule %s on %s: %s %.2f", event_id[:8], firing.app, firing.rule, firing.source,
                 d.label, d.score)
        return event

    def _render(self, frame: Frame, detections: list[Detection], firing: Firing) -> bytes | None:
        try:
            if frame.kind == "camera":
                return draw_snapshot(frame.data, detections, highlight=firing.detection)
            return render_telemetry_card(frame.source, frame.values or {}, firing.detection, firing.ts)
        except (ValueError, OSError) as e:
            log.warning("event on %s has no snapshot: %s", frame.source, e)
            return None

    def prune(self) -> int:
        """Apply retention; returns how many events were removed. Blocking: run it in an executor."""
        r = self._settings.retention
        removed = self._store.events.prune(time.time() - r.max_age_days * 86400, r.max_snapshot_bytes)
        for event in removed:
            if event.snapshot:
                (self._settings.state_dir / event.snapshot).unlink(missing_ok=True)
                (self._settings.state_dir / frame_file(event.snapshot)).unlink(missing_ok=True)
        if removed:
            log.info("retention: removed %d old events and their snapshots", len(removed))
        return len(removed)
