"""What site staff do through the console and the API, each written to the audit log with who and from where.

The API routes (and the console pages) call these; they do not touch the store's write methods
themselves, so a change cannot skip its audit line.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from appliance import packages
from appliance.auth import Actor
from appliance.rules import draw_snapshot
from appliance.samples.capture import SampleCapture
from appliance.store import AppRecord, EventRecord, HandlingAction, HandlingRecord, NotFound, Store
from common.files import write_atomically

REPORTED_APP = "(reported)"  # the app of an alert an operator raised by hand


def handle_event(store: Store, event_id: str, action: HandlingAction, note: str, by: Actor,
                 samples: SampleCapture | None = None) -> HandlingRecord:
    """Acknowledge an event, mark it a false positive or a missed detection (its frame becomes a hard
    sample, as the app's policy allows), or add a note."""
    record = store.handling.add(event_id, action, by.name, note)
    store.audit_log.add(by.name, "event.handle", {"event": event_id, "action": action, "note": note}, by.address)
    event = store.events.get(event_id) if samples is not None else None
    if samples is not None and event is not None and action in ("false_positive", "missed_detection"):
        samples.flag_event(event, action)
    return record


def set_app_enabled(store: Store, name: str, enabled: bool, by: Actor) -> AppRecord:
    """Enable or disable an app; the daemon picks the change up within a second."""
    record = store.apps.set_enabled(name, enabled)
    store.audit_log.add(by.name, "app.enable" if enabled else "app.disable", {"app": name}, by.address)
    return record


def rollback_app(store: Store, name: str, by: Actor) -> AppRecord:
    """Go back to the app's version before its last upgrade (no gap in serving)."""
    if store.apps.get(name) is None:
        raise NotFound(f"no app named {name!r} is installed (see GET /api/v1/apps)")
    return packages.rollback_app(store, name, by.name, by.address)


def report_missed(store: Store, snapshots_dir: Path, source: str, frame: bytes, label: str, note: str,
                  by: Actor, samples: SampleCapture | None = None) -> EventRecord:
    """An operator saw something on a camera's frame that no app flagged: keep the frame as an alert,
    marked as a missed detection, so it is counted and can go back for retraining."""
    now = time.time()
    event_id = uuid.uuid4().hex
    rel = f"snapshots/{datetime.fromtimestamp(now, UTC).strftime('%Y-%m-%d')}/{event_id}.jpg"
    try:
        snapshot: bytes | None = draw_snapshot(frame, [])
    except (ValueError, OSError):
        snapshot = None  # the frame does not decode: the alert is kept without a picture
    if snapshot is not None:
        write_atomically(snapshots_dir.parent / rel, snapshot)
    event = EventRecord(id=event_id, ts=now, app=REPORTED_APP, source=source, rule="reported by an operator",
                        label=label or "missed", score=0.0, box=None, snapshot=rel if snapshot else None,
                        snapshot_bytes=len(snapshot or b""), created=now)
    store.events.add(event)
    store.handling.add(event_id, "missed_detection", by.name, note)
    store.audit_log.add(by.name, "event.report_missed", {"event": event_id, "source": source, "label": event.label,
                                                         "note": note}, by.address)
    if samples is not None:
        samples.flag_frame(source, frame, event.label)
    return event


def set_subscription(store: Store, app: str, subscribe: bool, by: Actor) -> None:
    """Follow (or stop following) an AppStore app beside the channel's; the sync does the rest."""
    changed = store.subscriptions.add(app, by.name) if subscribe else store.subscriptions.remove(app)
    if changed:
        store.audit_log.add(by.name, "app.subscribe" if subscribe else "app.unsubscribe", {"app": app}, by.address)
