"""The managed broker: Mosquitto run from the files :mod:`appliance.devices.mosquitto` writes, by the daemon or
by systemd (``broker.supervisor``: :mod:`appliance.devices.processes`).

Its log lines come into the appliance's log (``appliance.mosquitto``), and what they say of each device
(connections, messages, refusals: :mod:`appliance.devices.activity`) into the device registry, for the
console. A change to the registry (from the console, or from ``appliance devices`` in another process: the
store's ``devices_generation``) rewrites the files and sends SIGHUP, which reloads the ACL, the password file
and the CRL without dropping the other devices' connections. Three cases restart Mosquitto instead, because a
reload would not be enough: a certificate replaced while its device stays allowed (SIGHUP does not check
connected clients against the CRL, so a session on the old key would keep the device's rights), a reload that
logged an error (Mosquitto then runs without the file it could not read), and a new configuration (the
listeners are opened at start only: a Mosquitto run by systemd may have started with an earlier daemon's).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading

from appliance.devices.activity import BrokerActivity
from appliance.devices.ca import DAEMON_ID, DAEMON_STEM, DeviceCA
from appliance.devices.mosquitto import BrokerFiles, write_broker_files
from appliance.devices.processes import ChildMosquitto, ManagedBrokerError, MosquittoProcess, UnitMosquitto, runs
from appliance.settings import BrokerSettings, Settings
from appliance.store import Store

__all__ = ["ManagedBroker", "ManagedBrokerError"]

log = logging.getLogger("appliance.mosquitto")

RELOAD_TIMEOUT_S = 5.0
RELOAD_ERRORS_S = 0.5  # after "Reloading config.", errors about the files come within this


class ManagedBroker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ca = DeviceCA(settings.state_dir / "devices", settings.device_id)
        self.files = BrokerFiles(settings.state_dir / "broker")
        self.daemon_identity = self.ca.daemon(settings.broker.certificate_days)
        b = settings.broker
        self.activity = BrokerActivity({b.device_port: "certificate", b.password_port: "password", b.port: "daemon",
                                        b.anonymous_port: "anonymous"})
        self._process: MosquittoProcess | None = None
        self._stopping = threading.Event()
        self._refreshing = threading.Lock()  # the daemon's poll and a console request may both refresh
        self._reloading = threading.Event()
        self._reload_errors: list[str] = []
        self._generation = -1
        self._revoked: set[str] = set()

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
        return self._process is not None and self._process.pid() is not None

    def refresh(self, store: Store, force: bool = False) -> bool:
        """Rewrite the files when the registry changed (or ``force``), and make a running Mosquitto take them
        before returning."""
        with self._refreshing:
            generation = store.devices.generation()
            if generation == self._generation and not force:
                return False
            devices, revoked = store.devices.all(), store.devices.revoked_certificates()
            written = write_broker_files(self.files, self.settings, self.ca, devices, revoked)
            first, self._generation = self._generation == -1, generation
            now_revoked = {serial for serial, _device, _at in revoked}
            allowed = {d.id for d in devices if d.active}
            # at this daemon's first writing every revocation is already in the CRL a fresh Mosquitto reads; one
            # that ran before this daemon holds sessions from before only if the CRL changed meanwhile
            replaced = set() if first else \
                {device for serial, device, _at in revoked if serial not in self._revoked} & allowed
            self._revoked = now_revoked
            if self.running and self._process is not None:
                if written.config:
                    log.info("Mosquitto's configuration changed: restarting it")
                    self._process.restart()
                elif replaced:
                    log.info("certificate of %s replaced: restarting Mosquitto so that no session on the old key "
                             "stays", ", ".join(sorted(replaced)))
                    self._process.restart()
                elif first and written.crl:
                    log.info("certificates were revoked while the daemon was away: restarting Mosquitto so that no "
                             "session on a revoked key stays")
                    self._process.restart()
                elif not self._reload():
                    self._process.restart()
            return True

    def _reload(self) -> bool:
        pid = self._process.pid() if self._process is not None else None
        if pid is None:
            return True
        self._reload_errors = []
        self._reloading.clear()
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        if not self._reloading.wait(RELOAD_TIMEOUT_S):
            log.warning("Mosquitto did not confirm the reload within %.0f s; restarting it", RELOAD_TIMEOUT_S)
            return False
        self._stopping.wait(RELOAD_ERRORS_S)
        if self._reload_errors:
            log.error("Mosquitto could not reload its files (%s); restarting it, which refuses bad files",
                      "; ".join(self._reload_errors[:3]))
            return False
        return True

    def start(self, store: Store) -> None:
        b = self.settings.broker
        if b.supervisor == "systemd":
            self._process = UnitMosquitto(self.files, b.run_dir, self._observe)
        else:
            exe = shutil.which(b.mosquitto)
            if exe is None:
                raise ManagedBrokerError(f"broker.mode = \"managed\" runs Mosquitto, and {b.mosquitto!r} is not "
                                         "installed: install it (apt-get install mosquitto) or set broker.mosquitto")
            self._process = ChildMosquitto(exe, self.files, self._observe)
        self._process.prepare()
        self.refresh(store, force=True)
        self._process.start()
        log.info("managed Mosquitto up (run by %s): devices on %s:%s (certificate) and :%s (password), the "
                 "daemon on 127.0.0.1:%s", "systemd" if b.supervisor == "systemd" else "the daemon", b.device_host,
                 b.device_port, b.password_port, b.port)

    def _observe(self, line: str) -> None:
        if runs(line):
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
        self._stopping.set()
        if self._process is not None:
            self._process.stop()
