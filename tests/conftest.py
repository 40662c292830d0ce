"""Fixtures with real parts: a real mosquitto, the real daemon as a subprocess, real ONNX models."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate} (last: {last!r})")


def answers(url: str, proc: subprocess.Popen[Any], log: Path, what: str) -> Callable[[], bool]:
    """A :func:`wait_until` predicate: ``url`` answers 200 while ``proc`` (its output in ``log``) runs."""
    def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    return check


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by `make test` (tools/system-packages); never downloaded
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """The system's Chromium, driven by playwright (test_console_browser.py says how the consoles are tested)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every demo model, built once per session with the repository's generator."""
    from appliance.demo.modelgen import build_all

    return build_all(tmp_path_factory.mktemp("models"))


# Run as root, mosquitto switches to its own user, which cannot read files under pytest's private tmp_path.
# set_tcp_nodelay as production sites should (docs/configuration.md): no Nagle delay on what the broker sends
MOSQUITTO_BASE = ("user root\n" if os.geteuid() == 0 else "") + "set_tcp_nodelay true\n"


@dataclass
class Mosquitto:
    port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.conf.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: port_open(self.port), 10, what=f"mosquitto on port {self.port}")
        except AssertionError:
            self.proc.kill()
            self.proc.wait(5)
            output = self.conf.with_suffix(".log").read_text(errors="replace")
            raise AssertionError(f"mosquitto did not start: {output}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def mosquitto_with_password(folder: Path, user: str, password: str) -> Mosquitto:
    """A started Mosquitto on a free loopback port that lets in only ``user`` with ``password``."""
    port = free_port()
    passwd = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), user, password], check=True)
    conf = folder / "m.conf"
    conf.write_text(f"{MOSQUITTO_BASE}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n")
    broker = Mosquitto(port, conf)
    broker.start()
    return broker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or `tools/system-packages test`")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"{MOSQUITTO_BASE}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = Mosquitto(port, conf)
    broker.start()
    yield broker
    broker.stop()


class Subscriber:
    """A real MQTT client collecting messages of one topic filter."""

    def __init__(self, port: int, topic: str, v5: bool = False) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=proto)
        self._subscribed = False

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
            c.subscribe(topic, qos=1)

        def on_subscribe(c: mqtt.Client, u: Any, mid: Any, rc: Any, p: Any) -> None:
            self._subscribed = True

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(lambda: self._subscribed, 10, what=f"subscription to {topic}")

    def next_json(self, timeout: float = 20.0, where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout} s")
            try:
                _, payload, _ = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            doc: dict[str, Any] = json.loads(payload)
            if where(doc):
                return doc

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Publisher:
    def __init__(self, port: int, v5: bool = False) -> None:
        proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=proto)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, what="publisher connection")

    def publish(self, topic: str, payload: bytes, properties: Any = None) -> None:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Daemon:
    """The real daemon, run as ``appliance run --config FILE`` in a subprocess."""

    state_dir: Path
    config: Path
    http_port: int
    mqtt_port: int
    device: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    ssl_context: ssl.SSLContext | None = None  # set before start() for a daemon that serves HTTPS
    env: dict[str, str] = field(default_factory=dict)  # set before start(): more environment for the daemon

    def __post_init__(self) -> None:
        self.log_path = self.state_dir.parent / f"daemon-{self.http_port}.log"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.http_port}"

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(self.config), *args],
                           capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"appliance {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def start(self, healthy: bool = True) -> None:
        """Start the daemon and wait until it answers (and, with ``healthy``, reports itself healthy)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(self.config)],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env} if self.env else None)
        wait_until(lambda: self._ready(healthy), START_TIMEOUT_S, interval=0.1,
                   what=f"daemon health (log: {self.log_path})")

    def _ready(self, healthy: bool) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        try:
            status = self.status()
        except (urllib.error.URLError, OSError):
            return False
        return bool(status["health"]["ok"]) or not healthy

    def healthz(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=5, context=self.ssl_context) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=5, context=self.ssl_context) as r:
            data: bytes = r.read()
            return data

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/api/status"))
        return result

    def source(self, source_id: str) -> dict[str, Any] | None:
        return next((s for s in self.status()["sources"] if s["id"] == source_id), None)

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


DaemonFactory = Callable[..., Daemon]


def new_daemon(folder: Path, broker_port: int | None = None, extra: str = "", broker_extra: str = "") -> Daemon:
    """A daemon configured in ``folder`` on free ports (embedded broker unless ``broker_port``), not started."""
    http_port = free_port()
    embedded = broker_port is None
    mqtt_port = free_port() if broker_port is None else broker_port
    state = folder / f"state-{http_port}"
    config = folder / f"appliance-{http_port}.toml"
    config.write_text(textwrap.dedent(f"""\
        device_id = "test-{http_port}"
        state_dir = "{state}"
        [broker]
        mode = "{'embedded' if embedded else 'external'}"
        port = {mqtt_port}
        reconnect_min_s = 0.2
        reconnect_max_s = 1.0
        {{broker_extra}}
        [http]
        port = {http_port}
        """).replace("{broker_extra}", textwrap.dedent(broker_extra).strip()) + textwrap.dedent(extra))
    return Daemon(state, config, http_port, mqtt_port, f"test-{http_port}")


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def make(broker_port: int | None = None, extra: str = "", start: bool = True, broker_extra: str = "") -> Daemon:
        d = new_daemon(tmp_path, broker_port, extra, broker_extra)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()


def write_app(path: Path, name: str, model: str, sources: list[str], rules: list[dict[str, Any]],
              version: str = "1.0.0") -> Path:
    path.write_text(json.dumps({"schema": 1, "name": name, "version": version,
                                "model": {"name": model, "version": "1.0.0"}, "sources": sources, "rules": rules}))
    return path


def counter(metrics: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, or 0 if it is absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    del want
    return 0.0


os.environ.setdefault("PYTHONUNBUFFERED", "1")
