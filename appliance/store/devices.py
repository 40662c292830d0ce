"""``store.devices``: the cameras and sensors allowed on the managed broker, and the certificates revoked.

A revoked device keeps its row (the console shows it as revoked, and its id cannot be taken by accident);
every certificate ever revoked or replaced stays in ``revoked_certificates``, from which the CRL is made.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.errors import Conflict, NotFound, StoreError
from appliance.store.records import (
    DeviceActivity,
    DeviceAuth,
    DeviceRecord,
    RefusedConnection,
    SourceKind,
    device_from_row,
)

REFUSED_KEPT = 500  # rows of refused_connections kept: the most recent (a scan from many addresses stays bounded)
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # the ingest's source ids


class InvalidDevice(StoreError):
    """A device id or kind the registry cannot take; the message says what is allowed."""


class DeviceExists(Conflict):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id} exists already; renew its credentials (appliance devices renew "
                         f"{device_id}) or remove it first")


class NoSuchDevice(NotFound):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"no device {device_id}; see appliance devices list")


class Devices(Table):
    def add(self, device_id: str, kind: SourceKind, auth: DeviceAuth, cert_serial: str, expires: float | None,
            password_hash: str) -> None:
        check_device(device_id, kind)
        now = self._clock()

        def write(db: Database) -> None:
            if select(db, "SELECT 1 FROM devices WHERE id = ?", (device_id,)):
                raise DeviceExists(device_id)
            db.execute("INSERT INTO devices (id, kind, auth, created, cert_serial, expires, password_hash)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (device_id, kind, auth, now, cert_serial, expires, password_hash))

        self._write(write)

    def replace_credential(self, device_id: str, cert_serial: str, expires: float | None, password_hash: str) -> None:
        """A renewal: the new credential in, the old certificate (if any) revoked, the device active again."""
        now = self._clock()

        def write(db: Database) -> None:
            _revoke_certificate(db, device_id, now)
            db.execute("UPDATE devices SET cert_serial = ?, expires = ?, password_hash = ?, revoked = NULL"
                       " WHERE id = ?", (cert_serial, expires, password_hash, device_id))

        self._write(write)

    def revoke(self, device_id: str) -> DeviceRecord:
        now = self._clock()

        def write(db: Database) -> None:
            _revoke_certificate(db, device_id, now)
            db.execute("UPDATE devices SET revoked = coalesce(revoked, ?) WHERE id = ?", (now, device_id))

        self._write(write)
        return self.get(device_id)

    def remove(self, device_id: str) -> None:
        """Forget the device; its certificate stays revoked."""
        now = self._clock()

        def write(db: Database) -> None:
            _revoke_certificate(db, device_id, now)
            db.execute("DELETE FROM devices WHERE id = ?", (device_id,))

        self._write(write)

    def record_activity(self, devices: Mapping[str, DeviceActivity], refused: list[RefusedConnection]) -> None:
        """What the broker's log said since the last call: each device's connections, messages and refusals, and
        the connections refused before a device was known (the most recent ``REFUSED_KEPT`` are kept)."""
        if not devices and not refused:
            return
        rows = [(a.last_connect, a.last_message, a.refusals, a.last_refusal[:300], a.last_refusal_ts, device_id)
                for device_id, a in devices.items()]

        def write(db: Database) -> None:
            db.conn.executemany(
                "UPDATE devices SET"
                " last_connect = CASE WHEN ?1 IS NULL THEN last_connect ELSE max(coalesce(last_connect, 0), ?1) END,"
                " last_message = CASE WHEN ?2 IS NULL THEN last_message ELSE max(coalesce(last_message, 0), ?2) END,"
                " refusals = refusals + ?3,"
                " last_refusal = CASE WHEN ?5 IS NULL THEN last_refusal ELSE ?4 END,"
                " last_refusal_ts = coalesce(?5, last_refusal_ts) WHERE id = ?6", rows)
            db.conn.executemany(
                "INSERT INTO refused_connections (address, listener, reason, count, first, last, hint)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (address, listener, reason) DO UPDATE SET"
                " count = count + excluded.count, last = max(last, excluded.last),"
                " hint = CASE WHEN excluded.hint = '' THEN hint ELSE excluded.hint END",
                [(r.address, r.listener, r.reason, r.count, r.first, r.last, r.hint) for r in refused])
            db.execute("DELETE FROM refused_connections WHERE rowid NOT IN"
                       " (SELECT rowid FROM refused_connections ORDER BY last DESC LIMIT ?)", (REFUSED_KEPT,))

        self._write(write)

    def refused_connections(self, limit: int = 50) -> list[RefusedConnection]:
        rows = self._read(lambda db: select(db, "SELECT * FROM refused_connections ORDER BY last DESC LIMIT ?",
                                                (limit,)))
        return [RefusedConnection(address=str(r["address"]), listener=str(r["listener"]), reason=str(r["reason"]),
                                  count=int(r["count"]), first=float(r["first"]), last=float(r["last"]),
                                  hint=str(r["hint"])) for r in rows]

    def get(self, device_id: str) -> DeviceRecord:
        rows = self._read(lambda db: select(db, "SELECT * FROM devices WHERE id = ?", (device_id,)))
        if not rows:
            raise NoSuchDevice(device_id)
        return device_from_row(rows[0])

    def all(self) -> list[DeviceRecord]:
        return [device_from_row(r) for r in self._read(lambda db: select(db, "SELECT * FROM devices ORDER BY id"))]

    def generation(self) -> int:
        """Bumped by every change to who may connect (triggers), whichever process made it."""
        rows = self._read(lambda db: select(db, "SELECT value FROM meta WHERE key = 'devices_generation'"))
        return int(rows[0]["value"]) if rows else 0

    def revoked_certificates(self) -> list[tuple[str, str, float]]:
        """(serial, device, revoked at) of every certificate revoked or replaced."""
        rows = self._read(lambda db: select(db, "SELECT serial, device, revoked FROM revoked_certificates"
                                                " ORDER BY revoked"))
        return [(str(r["serial"]), str(r["device"]), float(r["revoked"])) for r in rows]


def check_device(device_id: str, kind: str) -> None:
    if not DEVICE_ID.fullmatch(device_id):
        raise InvalidDevice(f"device id {device_id[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting "
                            "with a letter or digit (it is the camera's or sensor's topic name)")
    if kind not in ("camera", "sensor"):
        raise InvalidDevice(f"device {device_id}: kind must be camera or sensor, not {kind[:40]!r}")


def _revoke_certificate(db: Database, device_id: str, now: float) -> None:
    """The device's current certificate into the revoked list (raises NoSuchDevice)."""
    row = select(db, "SELECT cert_serial FROM devices WHERE id = ?", (device_id,))
    if not row:
        raise NoSuchDevice(device_id)
    serial = str(row[0]["cert_serial"])
    if serial:
        db.execute("INSERT OR IGNORE INTO revoked_certificates (serial, device, revoked) VALUES (?, ?, ?)",
                   (serial, device_id, now))
