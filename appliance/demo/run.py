"""``make demo``: the daemon with a demo detector and gas-anomaly model, two simulated cameras and a sensor.

Models are generated on the spot (see :mod:`appliance.demo.modelgen`); nothing is downloaded.
Events are printed as they arrive on MQTT. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from appliance import __version__, packages
from appliance.auth import Accounts, Actor
from appliance.demo import store as demo_store
from appliance.demo.modelgen import build_anomaly, build_detector
from appliance.demo.simulators import CameraSimulator, GasSensorSimulator
from appliance.ingest.client import MqttClient, ReceiveMessage
from appliance.logs import setup_logging
from appliance.settings import Settings
from appliance.store import Store
from appliance.upgrade.install import register_environment
from appliance_launcher.state import Layout

log = logging.getLogger("appliance.demo")

DETECTOR_APP = {
    "schema": 1, "name": "ppe-watch", "version": "1.0.0",
    "description": "Raise an alert when a person is seen on a camera.",
    "model": {"name": "demo-detector", "version": "1.0.0"},
    "sources": ["cameras/+/frame"],
    "rules": [{"name": "person-seen", "labels": ["person"], "min_score": 0.5,
               "debounce": {"n": 2, "m": 3}, "cooldown_s": 10}],
    # the demo detector is always sure: keep a few frames at random as hard samples, to show the loop
    "samples": {"random_rate": 0.1, "per_minute": 6},
}
GAS_APP = {
    "schema": 1, "name": "gas-watch", "version": "1.0.0",
    "description": "Raise an alert when methane or temperature leave their normal range.",
    "model": {"name": "demo-gas-anomaly", "version": "1.0.0"},
    "sources": ["sensors/+/telemetry"],
    "rules": [{"name": "gas-anomaly", "labels": ["anomaly"], "min_score": 4.0, "cooldown_s": 15}],
}


def install_demo(settings: Settings) -> None:
    """Install the demo models and apps unless they are there already."""
    out = settings.state_dir / "demo-models"
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with Store(settings.db_path) as store:
        for build, name in ((build_detector, "demo-detector"), (build_anomaly, "demo-gas-anomaly")):
            if store.models.get(name, "1.0.0") is None:
                packages.install_model(store, settings.models_dir, build(out / name))
        for manifest in (DETECTOR_APP, GAS_APP):
            path = out / f"{manifest['name']}.json"
            path.write_text(json.dumps(manifest, indent=2))
            current = store.apps.get(str(manifest["name"]))
            if current is None or current.version != manifest["version"]:
                packages.install_app(store, path)


DEMO_ADMIN = "admin"
DEMO_PASSWORD_FILE = "demo-admin-password.txt"


def demo_login(settings: Settings) -> str:
    """How to log in to the demo's console. The first run makes an admin with a random password (never a
    default one), kept in a file only its owner can read so that later runs can say it again."""
    path = settings.state_dir / DEMO_PASSWORD_FILE
    with Store(settings.db_path) as store:
        if store.users.count() == 0:
            password = "-".join(secrets.token_urlsafe(6) for _ in range(3))
            Accounts(store).add_user(DEMO_ADMIN, "admin", password, Actor("demo", "local"))
            path.touch(mode=0o600)
            path.write_text(password + "\n", encoding="utf-8")
            return f"user {DEMO_ADMIN}, password {password} (made for this demo; also in {path})"
    if path.exists():
        return f"user {DEMO_ADMIN}, password in {path}"
    return "with a user made by `appliance users add NAME --role admin`"


def _environ(settings: Settings, url: str, token: str) -> dict[str, str]:
    """The daemon's environment: the demo's AppStore link, and hard samples sent to its inbox (a new real
    site keeps them on site: samples.upload = "off")."""
    return {**os.environ, **demo_store.link_environ(settings, url, token), "APPLIANCE_SAMPLES__UPLOAD": '"full"',
            "APPLIANCE_SAMPLES__SITE": '"demo"', "APPLIANCE_SAMPLES__UPLOAD_INTERVAL_S": "5.0"}


def _answers(settings: Settings) -> bool:
    h = settings.http
    try:
        context = ssl._create_unverified_context() if h.tls else None  # the daemon's own certificate
        urllib.request.urlopen(f"{'https' if h.tls else 'http'}://127.0.0.1:{h.port}/healthz", timeout=2,
                               context=context).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def run_demo(settings: Settings, config: Path | None = None) -> int:
    """The demo: the daemon runs from this checkout's environment under ``appliance-launcher`` (so that
    ``python -m appliance.demo.publish --release`` can show it upgrading itself), beside the demo AppStore,
    the simulators and an event printer in this process."""
    setup_logging(settings.log_level)
    install_demo(settings)
    login = demo_login(settings)
    repo, token = demo_store.prepare(settings, [DETECTOR_APP, GAS_APP])
    appstore, store_url = demo_store.serve(repo)
    layout = Layout(settings.state_dir.resolve())
    register_environment(layout, __version__, Path(sys.prefix))
    b, t = settings.broker, settings.topics
    sims = [CameraSimulator(b, "cam1", 0, prefix=t.cameras), CameraSimulator(b, "cam2", 1, prefix=t.cameras),
            GasSensorSimulator(b, "gas1", prefix=t.sensors)]
    events_topic = f"{t.appliance}/{settings.device_id}/events"
    watcher = MqttClient(b, client_id="demo-event-printer")

    def show(msg: ReceiveMessage) -> None:
        e = json.loads(msg.payload)
        snap = Path(settings.state_dir, e["snapshot"]) if e.get("snapshot") else "-"
        print(f"EVENT  {e['app']:<10} {e['source']:<5} {e['label']:<8} score {e['score']:.2f}  snapshot {snap}",
              flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    launcher = subprocess.Popen(
        [sys.executable, "-m", "appliance_launcher", "--root", str(layout.root)]
        + (["--config", str(config.resolve())] if config else []),
        env=_environ(settings, store_url, token), start_new_session=True)  # Ctrl-C reaches the demo, which stops it
    try:
        while not _answers(settings):
            if launcher.poll() is not None or stop.wait(0.2):
                return 1 if launcher.poll() is not None else 0
        watcher.subscribe(events_topic, show)
        watcher.start()
        for sim in sims:
            sim.start()
        h = settings.http
        scheme = "https" if h.tls else "http"
        print(f"""
Demo running: 2 simulated cameras (cam1, cam2) and a gas sensor (gas1) publish to the embedded broker.
  web console:     {scheme}://{h.host}:{h.port}/   log in as {login}
  AppStore:        {store_url} (channel {demo_store.CHANNEL}); publish a new version of ppe-watch and watch the
                   appliance take it within seconds:  .venv/bin/python -m appliance.demo.publish
  self-upgrade:    build this tree as the next appliance release, publish it, and watch the appliance switch
                   to it (console → System):  .venv/bin/python -m appliance.demo.publish --release
  hard samples:    console → Samples; in the AppStore's inbox:
                   .venv/bin/appstore --repo {demo_store.repo_dir(settings)} samples
  events on MQTT:  mosquitto_sub -h {b.host} -p {b.port} -t '{events_topic}' -v
  stored events:   .venv/bin/appliance events
  live status:     .venv/bin/appliance status     (or http://{h.host}:{h.port}/api/status and /metrics)
  your own image:  mosquitto_pub -h {b.host} -p {b.port} -t {t.cameras}/cam9/frame -f some.jpg
Press Ctrl-C to stop.
""", flush=True)
        while not stop.wait(0.5):
            if launcher.poll() is not None:
                log.error("the launcher exited with %s", launcher.returncode)
                return 1
        return 0
    finally:
        for sim in sims:
            sim.stop()
        watcher.stop()
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                launcher.kill()
        appstore.should_exit = True
