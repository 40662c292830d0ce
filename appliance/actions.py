"""What site staff do through the console and the API, each written to the audit log with who and from where.

The API routes (and the console pages) call these; they do not touch the store's write methods
themselves, so a change cannot skip its audit line.
"""

from __future__ import annotations

from appliance import packages
from appliance.auth import Actor
from appliance.store import AppRecord, HandlingAction, HandlingRecord, NotFound, Store


def handle_event(store: Store, event_id: str, action: HandlingAction, note: str, by: Actor) -> HandlingRecord:
    """Acknowledge an event, mark it a false positive or a missed detection, or add a note."""
    record = store.add_handling(event_id, action, by.name, note)
    store.audit(by.name, "event.handle", {"event": event_id, "action": action, "note": note}, by.address)
    return record


def set_app_enabled(store: Store, name: str, enabled: bool, by: Actor) -> AppRecord:
    """Enable or disable an app; the daemon picks the change up within a second."""
    record = store.set_app_enabled(name, enabled)
    store.audit(by.name, "app.enable" if enabled else "app.disable", {"app": name}, by.address)
    return record


def rollback_app(store: Store, name: str, by: Actor) -> AppRecord:
    """Go back to the app's version before its last upgrade (no gap in serving)."""
    if store.get_app(name) is None:
        raise NotFound(f"no app named {name!r} is installed (see GET /api/v1/apps)")
    return packages.rollback_app(store, name, by.name, by.address)
