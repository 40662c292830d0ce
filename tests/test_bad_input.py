"""Bad input is refused with a counted reason and a log line; the other sources keep being served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.demo.scene import render_frame
from tests.conftest import DaemonFactory, Publisher, counter, wait_until, write_app
from tests.test_e2e import install_demo_apps, serving

pytestmark = pytest.mark.slow


def rejected(d: Any, source: str, reason: str) -> float:
    return counter(d.metrics(), "appliance_frames_rejected_total", source=source, reason=reason)


def test_each_bad_message_is_rejected_counted_and_the_good_camera_keeps_going(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [ingest]
        max_frame_bytes = 300000
        """)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch", "gas-watch"), 30, what="apps serving")
    good = render_frame(2.0, 0)
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/good/frame", good)
        wait_until(lambda: (s := d.source("good")) and s["processed"] == 1, 20, what="first good frame")
        bad_frames = {
            "corrupt": (b"\xff\xd8\xff\xe0" + b"\x13" * 5000, "corrupt_image"),
            "truncated": (good[: len(good) // 2], "corrupt_image"),
            "text": (b"hello, this is not an image", "not_an_image"),
            "huge": (b"\xff\xd8" + b"\0" * 400_000, "too_large"),
        }
        for source, (payload, _) in bad_frames.items():
            pub.publish(f"cameras/{source}/frame", payload)
        bad_telemetry = {
            "garbled": (b"{not json", "bad_json"),
            "nan": (b'{"values": {"ch4": NaN}}', "bad_value"),
            "inf": (b'{"values": {"ch4": Infinity, "temp": 1}}', "bad_value"),
            "wrongshape": (json.dumps({"values": [1, 2]}).encode(), "bad_json"),
            "missing": (json.dumps({"values": {"temp": 20}}).encode(), "bad_telemetry"),
        }
        for source, (payload, _) in bad_telemetry.items():
            pub.publish(f"sensors/{source}/telemetry", payload)
        pub.publish("lights/cam1/frame", good)  # not ours: never subscribed
        for source, (_, reason) in {**bad_frames, **bad_telemetry}.items():
            wait_until(lambda s=source, r=reason: rejected(d, s, r) == 1, 20, what=f"{source} rejected as {reason}")
        pub.publish("cameras/good/frame", good)
        wait_until(lambda: (s := d.source("good")) and s["processed"] == 2, 20, what="good camera still served")
    finally:
        pub.close()
    status = d.status()
    truncated = next(s for s in status["sources"] if s["id"] == "truncated")
    assert truncated["last_reject"]["reason"] == "corrupt_image"
    assert "truncated" in d.log() and "corrupt_image" in d.log(), "the log names the source and the reason"
    text = d.cli("status").stdout
    assert "not_an_image 1" in text and "bad_value 1" in text
    assert status["health"]["ok"] and status["workers"][0]["restarts"] == 0


def door_daemon(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> Any:
    """A running daemon with one app, ``door``, that listens to ``cameras/door/frame`` only."""
    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "door", "demo-detector", ["cameras/door/frame"],
                                       [{"name": "r", "labels": ["person"]}])))
    d.start()
    wait_until(lambda: serving(d, "door"), 30, what="app serving")
    return d


def test_topic_for_an_unknown_source_is_counted_and_named(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = door_daemon(make_daemon, models, tmp_path)
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/backyard/frame", render_frame(0, 0))
        pub.publish("cameras/door/frame", render_frame(0, 0))
        wait_until(lambda: (s := d.source("door")) and s["processed"] == 1, 20, what="door served")
        wait_until(lambda: rejected(d, "(unknown)", "unknown_source") == 1, 10, what="unknown source counted")
    finally:
        pub.close()
    assert "backyard" in d.log() and "unknown_source" in d.log()
    assert "backyard" in d.cli("status").stdout


def test_a_disabled_app_stops_taking_its_cameras_and_takes_them_again_when_enabled(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = door_daemon(make_daemon, models, tmp_path)

    def processed() -> int:
        s = d.source("door")
        return int(s["processed"]) if s else 0

    def state() -> str:
        return str(next(a["state"] for a in d.status()["apps"] if a["name"] == "door"))

    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/door/frame", render_frame(0, 0))
        wait_until(lambda: processed() == 1, 20, what="door served")
        d.cli("apps", "disable", "door")
        wait_until(lambda: state() == "disabled", 20, what="app disabled")
        pub.publish("cameras/door/frame", render_frame(0, 0))
        wait_until(lambda: rejected(d, "(unknown)", "unknown_source") == 1, 10,
                   what="the camera of a disabled app refused as having no app")
        d.cli("apps", "enable", "door")
        wait_until(lambda: serving(d, "door"), 30, what="app serving again")
        pub.publish("cameras/door/frame", render_frame(0, 0))
        wait_until(lambda: processed() == 2, 20, what="door served again")
    finally:
        pub.close()


def test_hostile_telemetry_is_counted_throttled_and_leaves_the_log_readable(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    """Deep nesting and a number of thousands of digits, under the size limit: each one is counted as
    bad_json or bad_value, the log says so at most once a minute per source and reason, with no traceback,
    and 200 of them do not push the real lines out of the diagnostics' last 2000."""
    d = make_daemon(start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "gas-watch"), 30, what="gas-watch serving")
    hostile = {
        "deep": (b'{"values": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", "bad_json"),
        "digits": (b'{"values": {"ch4": ' + b"9" * 5000 + b"}}", "bad_json"),
        "big": (b'{"values": {"ch4": 1' + b"0" * 400 + b"}}", "bad_value"),
        "bigts": (b'{"ts": 1' + b"0" * 400 + b', "values": {"ch4": 0.5}}', "bad_value"),
    }
    pub = Publisher(d.mqtt_port)
    try:
        for _ in range(50):
            for source, (payload, _) in hostile.items():
                pub.publish(f"sensors/{source}/telemetry", payload)
        for source, (_, reason) in hostile.items():
            wait_until(lambda s=source, r=reason: rejected(d, s, r) == 50, 30, what=f"50 of {source} as {reason}")
        pub.publish("sensors/gas1/telemetry", json.dumps({"values": {"ch4": 0.5, "temp": 20}}).encode())
        wait_until(lambda: (s := d.source("gas1")) and s["processed"] == 1, 20, what="the real sensor still served")
    finally:
        pub.close()
    log = d.log()
    assert "Traceback" not in log and "RecursionError" not in log
    for source in hostile:
        assert sum(1 for line in log.splitlines() if f"sensor {source} rejected" in line) == 1, source
