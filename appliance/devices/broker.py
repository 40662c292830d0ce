"""The managed broker: Mosquitto as a supervised child of the daemon, run from the files
:mod:`appliance.devices.mosquitto` writes.

Its log lines come into the appliance's log (``appliance.mosquitto``), and the ones about devices
(connected, refused) into the device registry, for the console. It is restarted with backoff when it
dies; a change to the registry (from the console or from ``appliance devices`` in another process: the
store's ``devices_generation``) rewrites the files and sends SIGHUP, which reloads the ACL, the password
file and the CRL without dropping the other devices' connections.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from appliance.devices.ca import DAEMON_ID, DAEMON_STEM, DeviceCA
from appliance.devices.mosquitto import BrokerFiles, write_broker_files
from appliance.errors import ApplianceError
from appliance.settings import BrokerSettings, Settings
from appliance.store import Store
from common.backoff import Backoff

log = logging.getLogger("appliance.mosquitto")

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 5.0
CONNECTED = re.compile(r"New client connected from (\S+) as (\S+) \(.*?(?:u'([^']*)')?\)\.?$")
NOT_AUTHORISED = re.compile(r"Client (\S+) disconnected, not authori[sz]ed\.?$")
DENIED = re.compile(r"Denied PUBLISH from (\S+) .*'([^']+)'")


class ManagedBrokerError(ApplianceError):
    pass


class ManagedBroker:
    def __init__(self, settings: Settings, on_device: Callable[[str, str, str], None] | None = None) -> None:
        self.settings = settings
        self.ca = DeviceCA(settings.state_dir / "devices", settings.device_id)
        self.files = BrokerFiles(settings.state_dir / "broker")
        self.daemon_identity = self.ca.daemon(settings.broker.certificate_days)
        self.on_device = on_device  # (device id, "connected" | "refused", detail)
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()  # the daemon's poll and a console request may both refresh
        self._reloaded = threading.Event()
        self._generation = -1
        self._thread: threading.Thread | None = None

    def client_settings(self) -> BrokerSettings:
        """How the daemon connects: loopback, TLS, its own certificate from the device CA."""
        return self.settings.broker.model_copy(update={
            "tls_ca": self.ca.ca_file, "tls_cert": self.ca.folder / f"{DAEMON_STEM}.pem",
            "tls_key": self.ca.folder / f"{DAEMON_STEM}.key", "username": None, "password": None})

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def refresh(self, store: Store, force: bool = False) -> bool:
        """Rewrite the files when the registry changed (or ``force``), and reload a running Mosquitto."""
        with self._refreshing:
            generation = store.devices.generation()
            if generation == self._generation and not force:
                return False
            write_broker_files(self.files, self.settings, self.ca, store.devices.all(),
                               store.devices.revoked_certificates())
            self._generation = generation
            with self._lock:
                proc = self._proc if self.running else None
            if proc is not None:
                self._reloaded.clear()
                proc.send_signal(signal.SIGHUP)
                if not self._reloaded.wait(RELOAD_TIMEOUT_S):  # so that what the caller says is already true
                    log.warning("Mosquitto did not confirm the reload within %.0f s", RELOAD_TIMEOUT_S)
            return True

    def start(self, store: Store) -> None:
        exe = shutil.which(self.settings.broker.mosquitto)
        if exe is None:
            raise ManagedBrokerError(f"broker.mode = \"managed\" runs Mosquitto, and {self.settings.broker.mosquitto!r} "
                                     "is not installed: install it (apt-get install mosquitto) or set broker.mosquitto")
        self.refresh(store, force=True)
        self._spawn(exe)
        self._wait_listening()
        self._thread = threading.Thread(target=self._supervise, args=(exe,), name="mosquitto", daemon=True)
        self._thread.start()
        b = self.settings.broker
        log.info("managed Mosquitto up: devices on %s:%s (certificate) and :%s (password), the daemon on "
                 "127.0.0.1:%s", b.device_host, b.device_port, b.password_port, b.port)

    def _spawn(self, exe: str) -> None:
        with self._lock:
            self._proc = subprocess.Popen([exe, "-c", str(self.files.config)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, errors="replace",
                                          start_new_session=True)
        threading.Thread(target=self._read, args=(self._proc,), name="mosquitto-log", daemon=True).start()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ManagedBrokerError(f"Mosquitto exited at start (code {self._proc.returncode if self._proc else '?'}); "
                                         f"its log lines above say why (configuration {self.files.config})")
            try:
                socket.create_connection(("127.0.0.1", self.settings.broker.port), timeout=0.5).close()
                return
            except OSError:
                self._stopping.wait(0.05)
        raise ManagedBrokerError(f"Mosquitto did not listen on 127.0.0.1:{self.settings.broker.port} within "
                                 f"{START_TIMEOUT_S:.0f} s")

    def _supervise(self, exe: str) -> None:
        backoff, failures = Backoff(base_s=0.5, max_s=30.0), 0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            failures += 1
            delay = backoff.delay(failures)
            log.error("Mosquitto exited (code %s); starting it again in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return
            self._spawn(exe)
            if self._stopping.wait(5.0):
                return
            if self.running:
                failures = 0  # it stayed up: the next crash starts the backoff again

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            self._observe(line)
        proc.stdout.close()

    def _observe(self, line: str) -> None:
        if line.startswith("Reloading config"):
            self._reloaded.set()
        if m := CONNECTED.search(line):
            who = m.group(3) or m.group(2)
            if who != DAEMON_ID and self.on_device:
                self.on_device(who, "connected", m.group(1))
            log.info("%s", line)
        elif m := NOT_AUTHORISED.search(line):
            if self.on_device:
                self.on_device(m.group(1), "refused", "not authorised (wrong or revoked credentials)")
            log.warning("%s", line)
        elif m := DENIED.search(line):
            if self.on_device:
                self.on_device(m.group(1), "refused", f"publish to {m.group(2)} denied")
            log.warning("%s", line)
        elif line.startswith(("Error", "OpenSSL Error")) or "failed" in line:
            log.warning("%s", line)
        else:
            log.info("%s", line)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

