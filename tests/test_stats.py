"""What the daemon remembers per source stays bounded however many camera ids come and go: the console's
latest frames share a byte budget, a source silent for longer than ``ingest.source_forget_s`` is forgotten,
and only the latest ``ingest.unknown_sources_kept`` ids of sources no app listens to are kept."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from appliance.demo.scene import render_frame
from appliance.giveback import GiveBack
from appliance.runtime.results import Detection
from appliance.settings import IngestSettings
from appliance.stats import Stats
from tests.conftest import DaemonFactory, Publisher, counter, wait_until, write_app
from tests.test_e2e import PERSON_RULE, serving

MB = 1024 * 1024


def camera(stats: Stats, source: str, data: bytes, now: float) -> None:
    """What ingest does with an accepted camera frame."""
    stats.received(source, "camera", now)
    stats.frame(source, data, now)


def test_many_cameras_with_big_frames_stay_within_the_byte_budget() -> None:
    stats = Stats(latest_frames_bytes=8 * MB)
    now = time.time()
    for i in range(150):  # 150 cameras, a 512 KiB frame each: 75 MiB if every frame were kept
        camera(stats, f"cam{i}", bytes([i]) * (MB // 2), now + i * 0.001)
    assert stats.frame_bytes() <= 8 * MB
    kept = [i for i in range(150) if stats.last_frame(f"cam{i}") is not None]
    assert kept == list(range(134, 150)), "the frames updated most recently are the ones kept"
    assert stats.last_frame("cam149") == (now + 0.149, bytes([149]) * (MB // 2))
    assert len(stats.sources()) == 150, "a camera whose frame was let go is still counted"

    camera(stats, "cam0", b"\xff\xd8" * 1000, now + 1)  # a new frame from a camera comes back at once
    assert stats.last_frame("cam0") is not None and stats.frame_bytes() <= 8 * MB
    camera(stats, "huge", b"\0" * (9 * MB), now + 2)
    assert stats.last_frame("huge") is None, "a frame bigger than the whole budget is not kept"
    assert stats.frame_bytes() <= 8 * MB


def test_a_new_frame_replaces_the_cameras_last_one_in_the_budget() -> None:
    stats = Stats(latest_frames_bytes=MB)
    now = time.time()
    for k in range(100):
        camera(stats, "cam1", bytes([k]) * 300_000, now + k)
    assert stats.frame_bytes() == 300_000
    camera(stats, "cam2", b"x" * 300_000, now + 101)
    assert stats.frame_bytes() == 600_000 and stats.last_frame("cam1") is not None


def test_a_silent_source_is_forgotten_after_the_setting() -> None:
    stats = Stats(silent_after_s=5, forget_after_s=60)
    now = time.time()
    camera(stats, "old", b"\xff\xd8" * 100, now - 61)
    stats.result("old", now - 61, "ppe-watch", (Detection("person", 0.9),))
    stats.received("gas1", "sensor", now - 61)
    stats.values("gas1", {"ch4": 0.4}, now - 61)
    camera(stats, "quiet", b"\xff\xd8" * 100, now - 30)
    camera(stats, "live", b"\xff\xd8" * 100, now)
    states = {s.id: s.state for s in stats.sources()}
    assert states == {"quiet": "silent", "live": "receiving"}, "silent for 61 s of 60: forgotten; 30 s: silent"
    assert stats.last_frame("old") is None and stats.trend("gas1") == [], "its frame and trend went with it"
    assert stats.frame_bytes() == 400 and stats.tracked() == 2
    assert [row[0] for row in stats.counts()] == ["quiet", "live"], "gone from /metrics too"
    camera(stats, "old", b"\xff\xd8", now)
    old = next(s for s in stats.sources() if s.id == "old")
    assert old.received == 1 and old.state == "receiving" and old.last_result is None, "back, counted afresh"


def test_a_source_forgets_when_status_is_read_even_if_nothing_else_arrives() -> None:
    stats = Stats(silent_after_s=0.05, forget_after_s=0.2)
    camera(stats, "cam1", b"\xff\xd8" * 100, time.time())
    assert [s.state for s in stats.sources()] == ["receiving"]
    wait_until(lambda: not stats.sources(), 5, what="cam1 forgotten")
    assert stats.frame_bytes() == 0


def test_unknown_sources_are_capped() -> None:
    stats = Stats(unknown_kept=5)
    now = time.time()
    first = [stats.unknown_source(f"stray{i}", "unknown_source", now + i) for i in range(200)]
    assert all(first)
    unknown = stats.unknown()
    assert [u.id for u in unknown.recent] == [f"stray{i}" for i in range(195, 200)], "the latest, oldest first"
    assert unknown.rejected == {"unknown_source": 200}, "every message is still counted"
    assert stats.unknown_source("stray199", "unknown_source", now + 300) is False
    assert stats.unknown().recent[-1].count == 2


def test_memory_is_given_back_once_a_lot_was_let_go() -> None:
    stats = Stats(latest_frames_bytes=64 * MB, forget_after_s=0.2, silent_after_s=0.1)
    give_back = GiveBack(stats.frame_bytes, threshold_bytes=16 * MB)
    for i in range(40):
        camera(stats, f"cam{i}", bytes([i]) * MB, time.time())
    asyncio.run(give_back.check())
    assert give_back.trims == 0, "nothing was let go yet"
    for i in range(8):
        stats.forget(f"cam{i}")
    asyncio.run(give_back.check())
    assert give_back.trims == 0, "8 MB is under the threshold"
    wait_until(lambda: stats.tracked() == 0, 5, what="the cameras forgotten")
    asyncio.run(give_back.check())
    assert give_back.trims == 1, "40 MB let go since the highest: trimmed (glibc's malloc_trim)"
    asyncio.run(give_back.check())
    assert give_back.trims == 1, "and not again until more is let go"


def test_the_forget_setting_cannot_be_shorter_than_silent() -> None:
    with pytest.raises(ValueError, match="source_forget_s must be at least source_silent_s"):
        IngestSettings(source_silent_s=60, source_forget_s=30)


@pytest.mark.slow
def test_the_daemon_keeps_the_console_frames_within_budget_and_forgets_silent_cameras(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    frames = [render_frame(i * 0.3, i % 8) for i in range(6)]
    budget = sum(len(f) for f in frames[3:]) + 100  # room for three of the six cameras' frames
    d = make_daemon(start=False, extra=f"""
        [ingest]
        latest_frames_bytes = {budget}
        source_silent_s = 1
        source_forget_s = 3
        unknown_sources_kept = 2
        """)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.cli("users", "add", "nurse", "--role", "viewer", "--password-stdin", input="a quiet ward at night\n")
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="the app serving")
    console = httpx.Client(base_url=d.base_url)
    assert console.post("/api/v1/login", json={"user": "nurse", "password": "a quiet ward at night"}).status_code == 200
    pub = Publisher(d.mqtt_port)
    try:
        for i, frame in enumerate(frames):
            pub.publish(f"cameras/cam{i}/frame", frame)
        for i in range(5):  # no app listens to sensors here
            pub.publish(f"sensors/stray{i}/telemetry", b'{"values": {"ch4": 0.1}}')
        wait_until(lambda: len(d.status()["sources"]) == 6 and all(s["processed"] for s in d.status()["sources"]),
                   20, what="six cameras served")
        wait_until(lambda: counter(d.metrics(), "appliance_frames_rejected_total", source="(unknown)",
                                   reason="unknown_source") == 5, 10, what="the strays counted")
    finally:
        pub.close()
    assert counter(d.metrics(), "appliance_latest_frames_bytes") <= budget
    shown = [console.get(f"/sources/cam{i}/frame.jpg").status_code for i in range(6)]
    assert shown == [404, 404, 404, 200, 200, 200], "the console shows the latest frames the budget holds"
    unknown = d.status()["unknown_sources"]
    assert [u["id"] for u in unknown["recent"]] == ["stray3", "stray4"] and unknown["rejected"]["unknown_source"] == 5

    wait_until(lambda: not d.status()["sources"], 15, what="the silent cameras forgotten")
    assert counter(d.metrics(), "appliance_latest_frames_bytes") == 0
    assert counter(d.metrics(), "appliance_sources_tracked") == 0
    assert console.get("/sources/cam5/frame.jpg").status_code == 404
