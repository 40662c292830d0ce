"""The upgrade's parts on their own, on real SQLite and real files: the maintenance window, the carry-over of
a failed release's rows into the restored database, the release manifest, the channel's appliance
version as the AppStore publishes it and a device reads it, and pruning old releases."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from appliance.store import EventRecord, Store
from appliance.upgrade.agent import in_window, snapshot_db
from appliance.upgrade.carry import carry_over
from appliance.upgrade.install import prune, wheel_path
from appliance_launcher.launcher import _restore
from appliance_launcher.state import Layout
from formats.channel import ChannelDoc
from formats.errors import FormatError
from formats.release import ReleaseFile, ReleaseManifest, file_entry


@pytest.mark.parametrize(("window", "at", "inside"), [
    ("", "12:00", True), ("02:00-05:00", "02:00", True), ("02:00-05:00", "04:59", True),
    ("02:00-05:00", "05:00", False), ("02:00-05:00", "13:00", False),
    ("22:00-04:00", "23:30", True), ("22:00-04:00", "03:59", True), ("22:00-04:00", "04:00", False),
    ("22:00-04:00", "12:00", False),
])
def test_the_maintenance_window_is_local_time_and_may_cross_midnight(window: str, at: str, inside: bool) -> None:
    hour, minute = (int(x) for x in at.split(":"))
    assert in_window(window, datetime(2026, 12, 2, hour, minute)) is inside


def _event(i: int, ts: float) -> EventRecord:
    return EventRecord(id=f"e{i}", ts=ts, app="ppe-watch", source="cam1", rule="r", label="person", score=0.9)


def test_rows_the_failed_release_wrote_are_carried_once_into_the_restored_database(tmp_path: Path) -> None:
    db = tmp_path / "appliance.db"
    with Store(db) as store:
        store.events.add(_event(1, 100.0))
        store.audit_log.add("admin", "app.enable", {"app": "x"}, "local")
    snapshot = tmp_path / "snapshot.db"
    since = snapshot_db(db, snapshot) - 1
    with Store(db) as store:  # the failed release goes on writing, and adds a column of its own
        store.events.add(_event(2, since + 5))
        store.audit_log.add("appliance-upgrade", "upgrade.switch", {"version": "0.2.0"}, "appstore")
    with sqlite3.connect(db) as raw:
        raw.execute("ALTER TABLE events ADD COLUMN new_in_0_2 TEXT")
    carry = _restore(db, snapshot, since, tmp_path / "upgrade", "0.2.0")  # as the launcher takes a release back
    assert carry_over(db, carry)["events"] == 1
    assert carry_over(db, carry) == {"events": 0, "event_handling": 0, "audit_log": 0, "samples": 0}, "once only"
    with Store(db) as store:
        assert [e.id for e in store.events.recent(limit=10)] == ["e2", "e1"]
        assert [a.action for a in store.audit_log.recent()] == ["upgrade.switch", "app.enable"]


def _manifest(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "schema": 1, "version": "0.2.0", "python": "3.11", "platform": "linux-x86_64", "min_from": "0.1.0",
        "db_schema": 6, "files": [{"name": "edge_appliance-0.2.0-py3-none-any.whl", "sha256": "a" * 64,
                                   "length": 10}]}
    doc.update(changes)
    return json.dumps(doc).encode()


def test_a_release_manifest_must_hold_exactly_its_own_appliance_wheel() -> None:
    assert ReleaseManifest.parse(_manifest(), "release.json").appliance_wheel.length == 10
    with pytest.raises(FormatError, match="exactly one edge-appliance wheel of version 0.3.0"):
        ReleaseManifest.parse(_manifest(version="0.3.0"), "release.json")
    with pytest.raises(FormatError, match="files.0.sha256"):
        ReleaseManifest.parse(_manifest(files=[{"name": "edge_appliance-0.2.0-py3-none-any.whl", "sha256": "x",
                                                "length": 10}]), "release.json")
    with pytest.raises(FormatError, match="unknown key"):
        ReleaseManifest.parse(_manifest(run_this="rm -rf /"), "release.json")


def test_a_channel_names_the_appliance_release_for_its_devices_and_its_rollout_for_its_members() -> None:
    doc = ChannelDoc.model_validate({"schema": 1, "channel": "stable", "version": 3, "apps": {},
                                     "appliance": "0.1.0",
                                     "rollout": {"id": "r3", "apps": {}, "appliance": "0.2.0", "groups": ["canary"]}})
    assert doc.appliance_for("box-1", "canary") == "0.2.0"
    assert doc.appliance_for("box-2", "") == "0.1.0"
    halted = doc.model_copy(update={"rollout": doc.rollout.model_copy(update={"halted": True})})  # type: ignore[union-attr]
    assert halted.appliance_for("box-1", "canary") == "0.1.0", "a halted rollout sends its members back"
    plain = ChannelDoc.model_validate({"schema": 1, "channel": "stable", "version": 1, "apps": {"a": "1.0.0"}})
    assert "appliance" not in plain.to_json() and "allow_downgrade" not in plain.to_json(), \
        "a channel that does not name a release reads as before"


def test_a_third_release_prunes_the_oldest_and_the_wheels_only_it_named(tmp_path: Path) -> None:
    """keep_releases = 2: after 0.1.0 -> 0.2.0 -> 0.3.0, 0.1.0 goes with its own wheel; shared wheels stay, and
    current and previous stay even when fewer are to be kept."""
    layout = Layout(tmp_path / "box")
    shared = tmp_path / "numpy-2.0.0-cp311-cp311-linux_x86_64.whl"
    shared.write_bytes(b"the same dependency in every release")
    own: dict[str, ReleaseFile] = {}
    for version in ("0.1.0", "0.2.0", "0.3.0"):
        wheel = tmp_path / f"edge_appliance-{version}-py3-none-any.whl"
        wheel.write_bytes(f"the appliance at {version}".encode())
        own[version] = file_entry(wheel)
        manifest = ReleaseManifest(version=version, python="3.11", platform="linux-x86_64", min_from="0.1.0",
                                   db_schema=6, files=(own[version], file_entry(shared)))
        for f, src in ((own[version], wheel), (file_entry(shared), shared)):
            wheel_path(layout, f).parent.mkdir(parents=True, exist_ok=True)
            wheel_path(layout, f).write_bytes(src.read_bytes())
        folder = layout.release(version)
        folder.mkdir(parents=True)
        (folder / "release.json").write_text(manifest.model_dump_json(by_alias=True))
        (folder / ".installed").write_text("")
    layout.point(layout.current, "0.3.0")
    layout.point(layout.previous, "0.2.0")

    assert prune(layout, {"0.3.0", "0.2.0"}, 2) == ["0.1.0"]
    assert layout.installed_versions() == ["0.2.0", "0.3.0"] and not layout.release("0.1.0").exists()
    assert not wheel_path(layout, own["0.1.0"]).exists(), "the wheel only 0.1.0 named is gone"
    assert wheel_path(layout, own["0.2.0"]).exists() and wheel_path(layout, file_entry(shared)).exists()
    assert prune(layout, {"0.3.0", "0.2.0"}, 1) == [], "current and previous are never pruned"
