"""The managed broker: Mosquitto as a supervised child of the daemon, run from the files
:mod:`appliance.devices.mosquitto` writes.

Its log lines come into the appliance's log (``appliance.mosquitto``), and what they say of each device
(connections, messages, refusals: :mod:`appliance.devices.activity`) into the device registry, for the
console. It is restarted with backoff when it dies, and dies with the daemon
(a stale one left by a killed daemon is ended at the next start). A change to the registry (from the
console, or from ``appliance devices`` in another process: the store's ``devices_generation``) rewrites
the files and sends SIGHUP, which reloads the ACL, the password file and the CRL without dropping the
other devices' connections. Two cases restart Mosquitto instead, because a reload would not be enough:
a certificate replaced while its device stays allowed (SIGHUP does not check connected clients against
the CRL, so a session on the old key would keep the device's rights), and a reload that logged an error
(Mosquitto then runs without the file it could not read).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time

from appliance.devices.activity import BrokerActivity
from appliance.devices.ca import DAEMON_ID, DAEMON_STEM, DeviceCA
from appliance.devices.mosquitto import BrokerFiles, write_broker_files
from appliance.errors import ApplianceError
from appliance.settings import BrokerSettings, Settings
from appliance.store import Store
from common.backoff import Backoff
from common.process import die_with_parent

log = logging.getLogger("appliance.mosquitto")

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 5.0
RELOAD_ERRORS_S = 0.5  # after "Reloading config.", errors about the files come within this
STAYED_UP_S = 5.0


class ManagedBrokerError(ApplianceError):
    pass


class ManagedBroker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ca = DeviceCA(settings.state_dir / "devices", settings.device_id)
        self.files = BrokerFiles(settings.state_dir / "broker")
        self.daemon_identity = self.ca.daemon(settings.broker.certificate_days)
        b = settings.broker
        self.activity = BrokerActivity({b.device_port: "certificate", b.password_port: "password", b.port: "daemon",
                                        b.anonymous_port: "anonymous"})
        self._proc: subprocess.Popen[str] | None = None
        self._exe = ""
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _proc
        self._refreshing = threading.Lock()  # the daemon's poll and a console request may both refresh
        self._reloading = threading.Event()
        self._reload_errors: list[str] = []
        self._restart = threading.Event()  # the supervisor starts the next Mosquitto at once
        self._started = threading.Event()  # set by the supervisor each time a Mosquitto listens
        self._running = threading.Event()  # the current child logged that it runs
        self._generation = -1
        self._revoked: set[str] = set()
        self._thread: threading.Thread | None = None
        self._first_start_error = ""

    @property
    def client_id(self) -> str:
        """The daemon's MQTT client id: one that no device listener gives (they name each client after its
        device id, which never starts with "_"), so that no device can take the daemon's session over."""
        return f"{DAEMON_ID}-{self.settings.device_id}"

    def client_settings(self) -> BrokerSettings:
        """How the daemon connects: loopback, TLS, its own certificate from the device CA."""
        return self.settings.broker.model_copy(update={
            "tls_ca": self.ca.ca_file, "tls_cert": self.ca.folder / f"{DAEMON_STEM}.pem",
            "tls_key": self.ca.folder / f"{DAEMON_STEM}.key", "username": None, "password": None})

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def refresh(self, store: Store, force: bool = False) -> bool:
        """Rewrite the files when the registry changed (or ``force``), and make a running Mosquitto take them
        before returning."""
        with self._refreshing:
            generation = store.devices.generation()
            if generation == self._generation and not force:
                return False
            devices, revoked = store.devices.all(), store.devices.revoked_certificates()
            write_broker_files(self.files, self.settings, self.ca, devices, revoked)
            self._generation = generation
            now_revoked = {serial for serial, _device, _at in revoked}
            allowed = {d.id for d in devices if d.active}
            replaced = {device for serial, device, _at in revoked if serial not in self._revoked} & allowed
            self._revoked = now_revoked
            if self.running:
                if replaced:
                    log.info("certificate of %s replaced: restarting Mosquitto so that no session on the old key "
                             "stays", ", ".join(sorted(replaced)))
                    self._restart_now()
                elif not self._reload():
                    self._restart_now()
            return True

    def _reload(self) -> bool:
        with self._lock:
            proc = self._proc
        if proc is None:
            return True
        self._reload_errors = []
        self._reloading.clear()
        proc.send_signal(signal.SIGHUP)
        if not self._reloading.wait(RELOAD_TIMEOUT_S):
            log.warning("Mosquitto did not confirm the reload within %.0f s; restarting it", RELOAD_TIMEOUT_S)
            return False
        self._stopping.wait(RELOAD_ERRORS_S)
        if self._reload_errors:
            log.error("Mosquitto could not reload its files (%s); restarting it, which refuses bad files",
                      "; ".join(self._reload_errors[:3]))
            return False
        return True

    def _restart_now(self) -> None:
        self._started.clear()
        self._restart.set()
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
        if not self._started.wait(START_TIMEOUT_S):
            log.error("Mosquitto did not come back within %.0f s after a restart", START_TIMEOUT_S)

    def start(self, store: Store) -> None:
        exe = shutil.which(self.settings.broker.mosquitto)
        if exe is None:
            raise ManagedBrokerError(f"broker.mode = \"managed\" runs Mosquitto, and {self.settings.broker.mosquitto!r} "
                                     "is not installed: install it (apt-get install mosquitto) or set broker.mosquitto")
        self._exe = exe
        self._end_stale()
        self.refresh(store, force=True)
        self._thread = threading.Thread(target=self._supervise, name="mosquitto", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._started.wait(0.1):
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                self._stopping.set()
                raise ManagedBrokerError(self._first_start_error or f"Mosquitto did not listen on 127.0.0.1:"
                                         f"{self.settings.broker.port} within {START_TIMEOUT_S:.0f} s")
        b = self.settings.broker
        log.info("managed Mosquitto up: devices on %s:%s (certificate) and :%s (password), the daemon on "
                 "127.0.0.1:%s", b.device_host, b.device_port, b.password_port, b.port)

    def _end_stale(self) -> None:
        """A Mosquitto left by a daemon that was killed still holds the ports and the old files: end it."""
        try:
            pid = int(self.files.pid.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")  # noqa: SIM115
        except OSError:
            return
        if str(self.files.config).encode() not in cmdline:
            return
        log.warning("ending Mosquitto %s left running by an earlier start", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            self._stopping.wait(0.05)

    def _supervise(self) -> None:
        """Starts Mosquitto and starts it again when it ends; in this thread, which lives as long as the
        broker should, since the child dies with the thread that started it."""
        backoff, failures, first = Backoff(base_s=0.5, max_s=30.0), 0, True
        while not self._stopping.is_set():
            proc = self._spawn()
            if proc is None:
                return
            if self._listening(proc):
                self._started.set()
            elif first:
                self._first_start_error = (f"Mosquitto exited at start (code {proc.poll()}); its log lines above say "
                                           f"why (configuration {self.files.config})")
                return
            first = False
            up = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            if self._restart.is_set():
                self._restart.clear()
                continue
            failures = 1 if time.monotonic() - up > STAYED_UP_S else failures + 1
            delay = backoff.delay(failures)
            log.error("Mosquitto exited (code %s); starting it again in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return

    def _spawn(self) -> subprocess.Popen[str] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._running.clear()
            self._proc = subprocess.Popen(
                [self._exe, "-c", str(self.files.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", preexec_fn=die_with_parent)  # noqa: PLW1509 (die with this thread)
            proc = self._proc
        self.files.pid.write_text(f"{proc.pid}\n")
        threading.Thread(target=self._read, args=(proc,), name="mosquitto-log", daemon=True).start()
        return proc

    def _listening(self, proc: subprocess.Popen[str]) -> bool:
        """Mosquitto says "running" once every listener is open (our own child's line, so not a stale one)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self._running.wait(0.05):
                return proc.poll() is None
            if proc.poll() is not None:
                return False
        return False

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if line := raw.rstrip():
                self._observe(line)
        proc.stdout.close()

    def _observe(self, line: str) -> None:
        if line.startswith("mosquitto version") and line.endswith(" running"):
            self._running.set()
            log.info("%s", line)
        elif line.startswith("Reloading config"):
            self._reloading.set()
            log.info("%s", line)
        elif self.activity.observe(line):
            return
        elif line.startswith("Error") or "failed" in line:
            if self._reloading.is_set() and line.startswith("Error"):  # about its files, not a client
                self._reload_errors.append(line)
            log.warning("%s", line)
        else:
            log.info("%s", line)

    def flush(self, store: Store) -> None:
        """What the log said of the devices since the last flush, into the registry (the console reads it there)."""
        devices, refused = self.activity.take()
        store.devices.record_activity(devices, refused)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
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
