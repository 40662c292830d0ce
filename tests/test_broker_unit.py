"""The managed broker run by systemd (``broker.supervisor = "systemd"``, the OS image): the daemon follows the
log of a Mosquitto it did not start, keeps that log short, and signals it by the pid it wrote.

Without systemd here, :class:`PathUnit` does what ``appliance-broker.path`` and ``.service`` do: once the
configuration exists it runs Mosquitto from it, and at once again whenever it ends. The image's boot test
(tests/test_image_boot.py) runs the real units."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.devices import processes
from appliance.devices.mosquitto import BrokerFiles
from appliance.devices.processes import UnitMosquitto
from tests.conftest import free_port, wait_until


class PathUnit:
    """appliance-broker.path and .service without systemd: Mosquitto from ``config`` once it exists, started
    again at once whenever it ends, in a runtime folder that outlives it."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.pids: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="path-unit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        exe = shutil.which("mosquitto")
        assert exe is not None, "mosquitto is not installed: run `make test` (it installs it)"
        while not self._stop.is_set():
            if not self.config.exists():
                self._stop.wait(0.05)  # systemd's inotify watch, as a poll
                continue
            self._proc = subprocess.Popen([exe, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
            self.pids.append(self._proc.pid)
            self._proc.wait()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._thread.join(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[UnitMosquitto, PathUnit, int, list[str]]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    files = BrokerFiles(tmp_path / "broker")
    files.folder.mkdir()
    port = free_port()
    lines: list[str] = []
    follower = UnitMosquitto(files, run_dir, lines.append)
    follower.prepare()
    # "user": as the daemon writes it (Mosquitto started as root would otherwise switch to "mosquitto")
    files.config.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                            f"log_dest file {run_dir}/mosquitto.log\n"
                            f"pid_file {run_dir}/mosquitto.pid\nlog_timestamp false\nlog_type all\n"
                            "connection_messages true\n")
    unit = PathUnit(files.config)
    try:
        yield follower, unit, port, lines
    finally:
        follower.stop()
        unit.stop()


def connect(port: int, client_id: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(lambda: client.is_connected(), 10, what=f"{client_id} connected")
    finally:
        client.disconnect()  # before loop_stop, which otherwise waits out the loop's one-second select
        client.loop_stop()


def clients_in(lines: list[str]) -> list[str]:
    """The client ids of Mosquitto's "New client connected from ADDRESS as ID (...)." lines."""
    return [found.group(1) for line in lines if (found := re.match(r"New client connected from \S+ as (\S+) ", line))]


def connected(lines: list[str]) -> set[str]:
    return set(clients_in(lines))


def test_the_daemon_follows_the_log_of_a_mosquitto_it_did_not_start_through_rotations_and_restarts(
        broker: tuple[UnitMosquitto, PathUnit, int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    follower, unit, port, lines = broker
    monkeypatch.setattr(processes, "ROTATE_BYTES", 2048)  # a few connections' lines
    follower.start()  # Mosquitto says it runs once its listener is open
    assert follower.pid() == unit.pids[0]
    clients = [f"cam{i}" for i in range(40)]
    for client in clients[:20]:
        connect(port, client)
    wait_until(lambda: connected(lines) >= set(clients[:20]), 20, what="every connection followed")
    log = follower.log_file
    assert log.stat().st_size < 2 * 2048, "the followed log is kept short (renamed, Mosquitto opens a new one)"
    wait_until(lambda: not log.with_name(log.name + ".1").exists(), 10, what="a read-out old log removed")

    follower.restart()  # SIGTERM; the unit starts it again at once, and it says so
    assert len(unit.pids) == 2 and follower.pid() == unit.pids[1]
    for client in clients[20:]:
        connect(port, client)
    wait_until(lambda: connected(lines) >= set(clients), 20, what="every connection after the restart followed")
    assert sorted(clients_in(lines)) == sorted(clients), "no line lost or read twice across rotations and restarts"
