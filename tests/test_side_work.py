"""The work beside the rules (sample capture, result publishing, the live feed) cannot stop the alerts.

The real daemon runs in this process (its own event loop on a thread) with the embedded broker, real ONNX
Runtime workers and real SQLite, so that the sample capture can be made to fail at its seam.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from appliance.app import Daemon
from appliance.demo.scene import render_frame
from appliance.samples.capture import SampleCapture
from appliance.settings import load_settings
from tests.conftest import DaemonFactory, Publisher, counter, wait_until, write_app

RULE = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "debounce": {"n": 1, "m": 1}, "cooldown_s": 0}


class InProcess:
    """A Daemon started and stopped on an event loop of its own thread."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: object, timeout: float = 120.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.call(self.daemon.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def start_in_process(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> InProcess:
    """ppe-watch (every person an alert) on a daemon run in this process."""
    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [RULE])))
    running = InProcess(Daemon(load_settings(d.config, environ={})))
    running.call(running.daemon.start())
    return running


def test_a_failing_sample_capture_does_not_stop_the_alerts(monkeypatch: pytest.MonkeyPatch, make_daemon: DaemonFactory,
                                                           models: dict[str, Path], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: SampleCapture, *args: object) -> None:
        raise RuntimeError("the sample spool is on fire")

    monkeypatch.setattr(SampleCapture, "on_result", broken)
    caplog.set_level(logging.INFO)
    running = start_in_process(make_daemon, models, tmp_path)
    try:
        daemon = running.daemon
        store = daemon.store
        assert store is not None
        pub = Publisher(daemon.settings.broker.port)
        try:
            for i in range(3):
                pub.publish("cameras/cam1/frame", render_frame(float(i), 0))
                wait_until(lambda i=i: len(store.events.recent(10)) >= i + 1, 30,  # type: ignore[misc]
                           what=f"alert {i + 1} despite the failing capture")
        finally:
            pub.close()
        assert counter(daemon.metrics.render().decode(), "appliance_side_work_errors_total", work="samples") == 3
        logged = [r for r in caplog.records if "the sample spool is on fire" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR, "once a minute per cause, not per frame"
        assert logged[0].exc_info is not None, "with its traceback, once"
    finally:
        running.close()
