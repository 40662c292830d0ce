"""What an unattended box must survive: SIGKILL, a crashing or hanging model, a broker restart, overload."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.demo.scene import render_frame
from tests.conftest import DaemonFactory, Mosquitto, Publisher, Subscriber, counter, wait_until, write_app
from tests.test_e2e import PERSON_RULE, install_demo_apps, serving

pytestmark = pytest.mark.slow


def processed(d: Any, source: str) -> int:
    s = d.source(source)
    return int(s["processed"]) if s else 0


def test_sigkill_keeps_models_apps_and_events(make_daemon: DaemonFactory, models: dict[str, Path],
                                              tmp_path: Path) -> None:
    d = make_daemon(start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    pub = Publisher(d.mqtt_port)
    pub.publish("cameras/cam1/frame", render_frame(0, 0))
    wait_until(lambda: json.loads(d.cli("events", "--json").stdout), 20, what="an event stored")
    pub.close()
    before = json.loads(d.cli("events", "--json").stdout)
    d.kill()
    d.start()
    wait_until(lambda: serving(d, "ppe-watch", "gas-watch"), 30, what="apps serving after restart")
    assert json.loads(d.cli("events", "--json").stdout) == before
    assert "demo-detector" in d.cli("models", "list").stdout and "gas-watch" in d.cli("apps", "list").stdout
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(1, 0))
        wait_until(lambda: processed(d, "cam1") == 1, 20, what="serving again after the restart")
    finally:
        pub.close()


def test_killed_worker_is_restarted_and_counted(make_daemon: DaemonFactory, models: dict[str, Path],
                                                tmp_path: Path) -> None:
    d = make_daemon(start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    old_pid = d.status()["workers"][0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    worker = wait_until(lambda: (w := d.status()["workers"][0])["state"] == "ready" and w["pid"] != old_pid and w,
                        30, what="worker restarted")
    assert worker["restarts"] == 1 and "exit code -9" in worker["last_restart_reason"]
    assert counter(d.metrics(), "appliance_worker_restarts_total", partition="cpu") == 1
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving again")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(0, 0))
        wait_until(lambda: processed(d, "cam1") == 1, 20, what="frames served by the new worker")
    finally:
        pub.close()


def test_hanging_model_is_killed_then_quarantined_and_other_apps_keep_serving(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [runtime]
        inference_timeout_s = 1.0
        restart_backoff_min_s = 0.1
        restart_backoff_max_s = 0.5
        strikes_before_quarantine = 2
        """)
    install_demo_apps(d, models, tmp_path)
    d.cli("models", "add", str(models["demo-hang"]))
    d.cli("apps", "add", str(write_app(tmp_path / "hang.json", "stuck", "demo-hang", ["cameras/stuck/frame"],
                                       [{"name": "r", "labels": ["red"]}])))
    d.start()
    wait_until(lambda: serving(d, "ppe-watch", "stuck"), 30, what="apps serving")
    pub = Publisher(d.mqtt_port)
    try:
        for strike in (1, 2):
            pub.publish("cameras/stuck/frame", render_frame(0, 0))
            wait_until(lambda s=strike: d.status()["workers"][0]["restarts"] == s, 30, what=f"hang #{strike} killed")
            if strike == 1:
                wait_until(lambda: serving(d, "stuck"), 30, what="model loaded again after the restart")
        wait_until(lambda: serving(d, "ppe-watch"), 30, what="worker back with the healthy model")
        stuck = next(a for a in d.status()["apps"] if a["name"] == "stuck")
        assert stuck["state"] == "degraded" and "quarantined" in stuck["reason"]
        assert "ran" in d.status()["workers"][0]["last_restart_reason"]
        pub.publish("cameras/stuck/frame", render_frame(0, 0))
        pub.publish("cameras/cam1/frame", render_frame(0, 0))
        wait_until(lambda: processed(d, "cam1") == 1, 20, what="the healthy app still served")
        wait_until(lambda: processed(d, "stuck") == 1, 20,
                   what="the same camera still served by the healthy app that shares it")
    finally:
        pub.close()
    assert d.status()["workers"][0]["restarts"] == 2, "a quarantined model is not loaded again"


def test_reconnects_and_resubscribes_after_broker_restart(mosquitto: Mosquitto, make_daemon: DaemonFactory,
                                                          models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(broker_port=mosquitto.port, start=False)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    mosquitto.stop()
    wait_until(lambda: not d.status()["broker"]["connected"], 20, what="daemon notices the broker is gone")
    assert not d.status()["health"]["ok"]
    mosquitto.start()
    wait_until(lambda: d.status()["broker"]["connected"], 30, what="reconnected")
    status = Subscriber(mosquitto.port, f"appliance/{d.device}/status")
    pub = Publisher(mosquitto.port)
    try:
        assert status.next_json(10)["state"] == "online", "retained status republished on reconnect"
        pub.publish("cameras/cam1/frame", render_frame(0, 0))
        wait_until(lambda: processed(d, "cam1") == 1, 20, what="frames served after the broker restart")
    finally:
        pub.close()
        status.close()


def test_last_will_says_offline_when_the_daemon_dies(mosquitto: Mosquitto, make_daemon: DaemonFactory) -> None:
    d = make_daemon(broker_port=mosquitto.port)
    status = Subscriber(mosquitto.port, f"appliance/{d.device}/status")
    try:
        first = status.next_json(10)
        assert first["state"] == "online" and first["version"]
        d.kill()
        assert status.next_json(15)["state"] == "offline"
    finally:
        status.close()


def test_overload_drops_old_frames_and_counts_them(make_daemon: DaemonFactory, models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [runtime]
        max_inflight = 1
        """)
    install_demo_apps(d, models, tmp_path)
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="app serving")
    frames = [render_frame(i / 10, 0) for i in range(10)]
    pub = Publisher(d.mqtt_port)
    try:
        for _ in range(20):
            for f in frames:
                pub.client.publish("cameras/busy/frame", f, qos=0)
        pub.publish("cameras/calm/frame", frames[0])
        pub.publish("cameras/busy/frame", frames[0])

        def settled() -> Any:
            s = d.source("busy")
            rej = sum(s["rejected"].values()) if s else 0
            return s and s["received"] == 201 and s["received"] == s["processed"] + s["skipped"] + rej and s

        busy = wait_until(settled, 60, what="every busy frame accounted for")
    finally:
        pub.close()
    assert busy["skipped"] > 0, "under overload older frames are dropped, not queued"
    assert busy["processed"] < 201
    wait_until(lambda: processed(d, "calm") == 1, 10, what="the calm camera was served too")


def test_retention_keeps_snapshots_within_quota(make_daemon: DaemonFactory, models: dict[str, Path],
                                                tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [retention]
        max_snapshot_bytes = 150000
        prune_interval_s = 0.2
        """)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.start()
    wait_until(lambda: serving(d, "ppe"), 30, what="app serving")
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    pub = Publisher(d.mqtt_port)
    seen = []
    try:
        for i in range(8):
            pub.publish(f"cameras/c{i}/frame", render_frame(i, i))
            seen.append(events.next_json(20))
    finally:
        pub.close()
        events.close()

    def on_disk() -> int:
        return sum(p.stat().st_size for p in (d.state_dir / "snapshots").rglob("*.jpg"))

    wait_until(lambda: on_disk() <= 150000, 20, what="snapshots pruned to the quota")
    kept = {e["id"] for e in json.loads(d.cli("events", "--json", "-n", "100").stdout)}
    assert seen[-1]["id"] in kept and seen[0]["id"] not in kept, "the oldest go first"


def test_model_that_hangs_while_loading_is_quarantined_and_the_rest_serve(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [runtime]
        load_timeout_s = 3.0
        restart_backoff_min_s = 0.1
        restart_backoff_max_s = 0.2
        strikes_before_quarantine = 2
        """)
    install_demo_apps(d, models, tmp_path)
    d.cli("models", "add", str(models["demo-load-hang"]))
    d.cli("apps", "add", str(write_app(tmp_path / "slow.json", "slow", "demo-load-hang", ["cameras/slow/frame"],
                                       [{"name": "r", "labels": ["red"]}])))
    d.start(healthy=False)
    slow = wait_until(lambda: next((a for a in d.status()["apps"] if a["name"] == "slow"
                                    and "quarantined" in a["reason"]), None), 60, what="quarantined at load")
    assert "loading demo-load-hang@1.0.0 took" in slow["reason"]
    wait_until(lambda: serving(d, "ppe-watch", "gas-watch"), 30, what="the other apps serve")
    assert d.status()["workers"][0]["restarts"] == 2


def _slow_model(folder: Path, seconds: float) -> Path:
    """A colour classifier that takes about ``seconds`` per real frame on this machine (and finishes)."""
    import numpy as np
    import onnxruntime as ort

    from appliance.demo.modelgen import build_hang_model

    def run_time(trips: int) -> float:
        model = build_hang_model(folder / f"probe-{trips}", "demo-slow", trip_count=trips)
        session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
        frame = np.ones((1, 3, 64, 64), np.float32)
        session.run(None, {"input": frame})
        t0 = time.perf_counter()
        session.run(None, {"input": frame})
        return time.perf_counter() - t0

    probe = 20_000
    trips = max(probe, int(probe * seconds / max(run_time(probe), 1e-6)))
    return build_hang_model(folder / "demo-slow", "demo-slow", trip_count=trips)


def test_a_frame_in_the_worker_at_shutdown_still_becomes_an_event(make_daemon: DaemonFactory,
                                                                   tmp_path: Path) -> None:
    d = make_daemon(start=False)
    # 3 s: the stop reaches the pipeline while the frame still runs, and the frame ends well within the drain (5 s)
    d.cli("models", "add", str(_slow_model(tmp_path, seconds=3.0)))
    d.cli("apps", "add", str(write_app(tmp_path / "slow.json", "slow-watch", "demo-slow", ["cameras/+/frame"],
                                       [{"name": "any-colour", "labels": ["red", "green", "blue"], "min_score": 0.0,
                                         "cooldown_s": 0}])))
    d.start()
    wait_until(lambda: serving(d, "slow-watch"), 30, what="app serving")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(0, 0))
        wait_until(lambda: d.status()["workers"][0]["inflight"] == 1, 20, what="the frame in the worker")
    finally:
        pub.close()
    assert d.stop() == 0
    events = json.loads(d.cli("events", "--json").stdout)
    assert [(e["app"], e["source"]) for e in events] == [("slow-watch", "cam1")], \
        "the frame handed to the worker before the stop was finished and its event stored"
