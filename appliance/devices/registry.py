"""Adding, renewing, revoking and removing cameras and sensors: the registry in the store, the certificate
from the device CA, the audit line, and the credentials handed over once.

A device's private key (or password) is made here, put in the credentials folder handed to whoever sets
the device up, and never stored on the box: the registry keeps the certificate's serial number (or the
password's hash). A lost key is replaced with ``renew``, which also revokes the old certificate.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import shlex
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.devices.ca import DeviceCA
from appliance.devices.mosquitto import device_topic, password_hash
from appliance.errors import ApplianceError
from appliance.settings import Settings
from appliance.store import Store
from appliance.store.devices import check_device
from appliance.store.records import DeviceAuth, DeviceRecord, SourceKind
from common.files import write_atomically
from pki.certs import pem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Issued:
    serial: str = ""  # the certificate's, hex
    expires: float | None = None
    password_hash: str = ""
    key: bytes = b""
    certificate: bytes = b""
    password: str = ""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a device needs to connect, handed over once."""

    device: DeviceRecord
    files: dict[str, bytes]  # file name -> content: key, certificate, CA, connect.json, README.txt

    def zip(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in self.files.items():
                z.writestr(f"{self.device.id}/{name}", data)
        return buf.getvalue()

    def write(self, folder: Path) -> list[Path]:
        """Into a new folder (0700), so that nothing else is overwritten or opened to others."""
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise ApplianceError(f"{folder} exists and is not an empty folder; give a new folder for the credentials")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        written = []
        for name, data in self.files.items():
            write_atomically(folder / name, data, mode=0o600)
            written.append(folder / name)
        return written


class Registry:
    def __init__(self, settings: Settings, store: Store, on_change: Callable[[], object] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.on_change = on_change  # the running daemon's managed broker takes the change before this returns
        self.ca = DeviceCA(settings.state_dir / "devices", settings.device_id)

    def add(self, device_id: str, kind: SourceKind, auth: DeviceAuth, actor: str, address: str) -> Credentials:
        check_device(device_id, kind)
        issued = self._issue(device_id, auth)
        self.store.devices.add(device_id, kind, auth, issued.serial, issued.expires, issued.password_hash)
        self.store.audit_log.add(actor, "devices.add", {"device": device_id, "kind": kind, "auth": auth,
                                                        "certificate": issued.serial}, address)
        creds = self._credentials(self.store.devices.get(device_id), issued)
        self._changed()
        return creds

    def renew(self, device_id: str, actor: str, address: str) -> Credentials:
        device = self.store.devices.get(device_id)
        issued = self._issue(device_id, device.auth)
        self.store.devices.replace_credential(device_id, issued.serial, issued.expires, issued.password_hash)
        self.store.audit_log.add(actor, "devices.renew", {"device": device_id, "certificate": issued.serial,
                                                          "replaced": device.cert_serial}, address)
        creds = self._credentials(self.store.devices.get(device_id), issued)
        self._changed()
        return creds

    def revoke(self, device_id: str, actor: str, address: str) -> DeviceRecord:
        device = self.store.devices.revoke(device_id)
        self.store.audit_log.add(actor, "devices.revoke", {"device": device_id, "certificate": device.cert_serial},
                                 address)
        self._changed()
        return device

    def remove(self, device_id: str, actor: str, address: str) -> None:
        device = self.store.devices.get(device_id)
        self.store.devices.remove(device_id)
        self.store.audit_log.add(actor, "devices.remove", {"device": device_id, "certificate": device.cert_serial},
                                 address)
        self._changed()

    def _changed(self) -> None:
        """The running broker takes the change now; if it cannot, the daemon's next poll tries again, and the
        change (already in the store and the audit log) is not undone."""
        if self.on_change is None:
            return
        try:
            self.on_change()
        except (OSError, ValueError) as e:
            log.error("the managed broker did not take the device change yet: %s", e)

    def _issue(self, device_id: str, auth: DeviceAuth) -> _Issued:
        if auth == "password":
            password = secrets.token_urlsafe(18)
            return _Issued(password_hash=password_hash(password), password=password)
        identity = self.ca.issue_device(device_id, self.settings.broker.certificate_days)
        return _Issued(serial=format(identity.certificate.serial_number, "x"),
                       expires=identity.certificate.not_valid_after_utc.timestamp(), key=identity.key_pem(),
                       certificate=pem(identity.certificate))

    def _credentials(self, device: DeviceRecord, issued: _Issued) -> Credentials:
        b = self.settings.broker
        host = (b.device_names or [b.device_host])[0]
        topic = device_topic(self.settings, device)
        files: dict[str, bytes] = {"ca.pem": self.ca.ca_pem}
        connect: dict[str, object] = {"device": device.id, "kind": device.kind, "host": host, "topic": topic}
        if device.auth == "certificate":
            files[f"{device.id}.key"], files[f"{device.id}.pem"] = issued.key, issued.certificate
            connect |= {"port": b.device_port, "tls": True, "client_certificate": f"{device.id}.pem",
                        "client_key": f"{device.id}.key", "ca": "ca.pem"}
            example = (f"mosquitto_pub -h {host} -p {b.device_port} --cafile ca.pem --cert {device.id}.pem "
                       f"--key {device.id}.key -t {shlex.quote(topic)} -f frame.jpg")
        else:
            connect |= {"port": b.password_port, "tls": True, "username": device.id, "password": issued.password,
                        "ca": "ca.pem"}
            example = (f"mosquitto_pub -h {host} -p {b.password_port} --cafile ca.pem -u {device.id} "
                       f"-P {shlex.quote(issued.password)} -t {shlex.quote(topic)} -f reading.json")
        files["connect.json"] = (json.dumps(connect, indent=1) + "\n").encode()
        files["README.txt"] = (
            f"Credentials of {device.kind} {device.id} for appliance {self.settings.device_id}, made "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime())}.\n"
            f"They are handed over once and not kept on the appliance: store them on the device and delete this "
            f"copy.\nThe device may publish {topic} and nothing else. Try it with:\n  {example}\n").encode()
        return Credentials(device, files)
