"""End to end: the real daemon, a real broker (embedded amqtt and mosquitto), real clients, real models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from appliance.demo.scene import render_frame
from tests.conftest import DaemonFactory, Mosquitto, Publisher, Subscriber, counter, wait_until, write_app

pytestmark = pytest.mark.slow

PERSON_RULE = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "debounce": {"n": 1, "m": 1},
               "cooldown_s": 0}
GAS_RULE = {"name": "gas-anomaly", "labels": ["anomaly"], "min_score": 4.0, "cooldown_s": 0}


def install_demo_apps(d: Any, models: dict[str, Path], tmp_path: Path) -> None:
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("models", "add", str(models["demo-gas-anomaly"]))
    d.cli("apps", "add", str(write_app(tmp_path / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.cli("apps", "add", str(write_app(tmp_path / "gas.json", "gas-watch", "demo-gas-anomaly",
                                       ["sensors/+/telemetry"], [GAS_RULE])))


def serving(d: Any, *apps: str) -> bool:
    states = {a["name"]: a["state"] for a in d.status()["apps"]}
    return all(states.get(a) == "serving" for a in apps)


@pytest.fixture(params=["embedded", "mosquitto"])
def running(request: pytest.FixtureRequest, make_daemon: DaemonFactory, models: dict[str, Path],
            tmp_path: Path) -> Any:
    if request.param == "mosquitto":
        broker: Mosquitto = request.getfixturevalue("mosquitto")
        d = make_daemon(broker_port=broker.port, start=False)
    else:
        d = make_daemon(start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch", "gas-watch"), 30, what="both apps serving")
    return d


def test_camera_frame_becomes_event_on_mqtt_and_in_store(running: Any) -> None:
    d = running
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(0.0, 0))
        event = events.next_json(30, where=lambda e: e["app"] == "ppe-watch")
    finally:
        pub.close()
        events.close()
    assert event["source"] == "cam1" and event["label"] == "person" and event["score"] >= 0.5
    assert len(event["box"]) == 4 and all(0 <= v <= 1 for v in event["box"])
    snapshot = d.state_dir / event["snapshot"]
    assert snapshot.read_bytes()[:2] == b"\xff\xd8", "the snapshot is a JPEG on disk"
    stored = json.loads(d.cli("events", "--json").stdout)
    assert event["id"] in {e["id"] for e in stored}
    assert counter(d.metrics(), "appliance_frames_processed_total", source="cam1") >= 1


def test_gas_spike_becomes_anomaly_event(running: Any) -> None:
    d = running
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("sensors/gas1/telemetry", json.dumps({"ts": 1732000000.5, "values": {"ch4": 0.5, "temp": 25}}).encode())
        pub.publish("sensors/gas1/telemetry", json.dumps({"ts": 1732000001.5, "values": {"ch4": 2.8, "temp": 25}}).encode())
        event = events.next_json(30, where=lambda e: e["app"] == "gas-watch")
    finally:
        pub.close()
        events.close()
    assert event["label"] == "anomaly" and event["score"] > 4 and event["ts"] == 1732000001.5
    src = wait_until(lambda: (s := d.source("gas1")) and s["processed"] == 2 and s, 10, what="both samples processed")
    assert src["last_values"] == {"ch4": 2.8, "temp": 25.0}


def test_mosquitto_pub_of_a_jpeg_file(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    """The README's promise: `mosquitto_pub -f some.jpg` against the running daemon yields an event."""
    import shutil
    import subprocess

    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub is not installed: run `make test` (it installs it) or `tools/system-packages test`")
    d = make_daemon(start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    jpg = tmp_path / "some.jpg"
    jpg.write_bytes(render_frame(3.0, 1))
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    try:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(d.mqtt_port), "-t", "cameras/cam7/frame",
                        "-f", str(jpg)], check=True, timeout=10)
        event = events.next_json(30)
    finally:
        events.close()
    assert event["source"] == "cam7" and event["label"] == "person"


def test_capture_time_from_mqtt5_user_property(mosquitto: Mosquitto, make_daemon: DaemonFactory,
                                               models: dict[str, Path], tmp_path: Path) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    d = make_daemon(broker_port=mosquitto.port, start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    pub = Publisher(d.mqtt_port, v5=True)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("ts", "1700000000.25")]
    try:
        pub.publish("cameras/cam5/frame", render_frame(1.0, 0), properties=props)
        event = events.next_json(30)
    finally:
        pub.close()
        events.close()
    assert math.isclose(event["ts"], 1700000000.25)


def test_every_result_is_published_when_asked(make_daemon: DaemonFactory, models: dict[str, Path],
                                              tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [outputs]
        results = true
        """)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    results = Subscriber(d.mqtt_port, f"appliance/{d.device}/results")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam3/frame", render_frame(0.0, 0))
        result = results.next_json(20)
    finally:
        pub.close()
        results.close()
    assert result["source"] == "cam3" and result["model"] == "demo-detector@1.0.0"
    assert result["arrived"] <= result["done"]
    # the frame's own decode + inference time, so integrations can tell the pipeline's share of the latency
    assert 0 < result["work_s"] <= result["done"] - result["arrived"]
    assert {det["label"] for det in result["detections"]} >= {"person"}
