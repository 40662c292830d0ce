"""The fleet registry in ``DIR/fleet.db`` (SQLite, WAL): devices (with the serial of a box that enrolled itself)
and their token hashes, admin tokens, each
device's last report, when each rollout started and ended, and the index of the samples in the inbox.

Tokens are shown once when made and stored only as sha256. The CLI and the server both open the file;
each call takes its own short connection and every write is one ``BEGIN IMMEDIATE`` transaction, so the
two processes never see half a change.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appstore.errors import FleetError
from formats.channel import DeviceReport
from formats.model_card import NAME_PATTERN

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, grp TEXT NOT NULL, channel TEXT NOT NULL,
    created REAL NOT NULL, serial TEXT);
CREATE TABLE IF NOT EXISTS admin_tokens (token_sha256 TEXT PRIMARY KEY, note TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (
    device TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE, received REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    channel TEXT NOT NULL, id TEXT NOT NULL, started REAL NOT NULL, ended REAL, outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (channel, id));
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL, sample_id TEXT NOT NULL, received REAL NOT NULL, reason TEXT NOT NULL,
    has_image INTEGER NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (device, sample_id));
CREATE INDEX IF NOT EXISTS samples_by_received ON samples (received);
"""


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    group: str  # as registered with `devices add`; a report's own group takes precedence in the fleet view
    channel: str
    created: float
    last_seen: float | None  # when its last report arrived (epoch seconds)
    report: DeviceReport | None


@dataclass(frozen=True, slots=True)
class SampleRow:
    """A sample's index row; its files are ``samples/{device}/{sample_id}.json`` (+ ``.jpg``)."""

    device: str
    sample_id: str
    received: float  # when the inbox stored it (epoch seconds)
    reason: str
    has_image: bool
    meta: str  # the sample record as the device sent it (JSON)


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    channel: str
    id: str
    started: float
    ended: float | None
    outcome: str  # "", "promoted" or "replaced"


class Fleet:
    def __init__(self, path: Path) -> None:
        self.path = path
        with closing(self._open()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(devices)")}
            if "serial" not in columns:  # a fleet.db from before zero-touch enrolment
                db.execute("ALTER TABLE devices ADD COLUMN serial TEXT")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with closing(self._open()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with closing(self._open()) as db:
            return list(db.execute(sql, args).fetchall())

    # devices and tokens

    def add_device(self, device_id: str, group: str = "", channel: str = "") -> str:
        """Register a device; returns its token, which is not stored and cannot be shown again."""
        if not DEVICE_ID.match(device_id):
            raise FleetError(f"device id {device_id!r} is not valid; use letters, digits, '.', '_' and '-' "
                             "(at most 64, starting with a letter or digit)")
        for what, value in (("group", group), ("channel", channel)):
            if value and not re.match(NAME_PATTERN, value):
                raise FleetError(f"--{what} {value!r} is not valid; use lowercase letters, digits, '.', '_' and '-'")
        token = secrets.token_urlsafe(32)
        with self._write() as db:
            if db.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone():
                raise FleetError(f"device {device_id} is already registered; to give it a new token remove it "
                                 f"first with: appstore devices remove {device_id}")
            db.execute("INSERT INTO devices (id, token_sha256, grp, channel, created) VALUES (?, ?, ?, ?, ?)",
                       (device_id, _hash(token), group, channel, time.time()))
        return token

    def enrol(self, device_id: str, serial: str, group: str, channel: str) -> str:
        """Register the box ``serial`` as ``device_id`` (zero-touch enrolment); returns a new token.

        Idempotent: the same box enrolling again (a retry after a lost answer, a re-provisioned box) keeps
        its device and gets a new token, which makes the old one invalid. A device id that another box, or
        an operator's `devices add`, holds already is refused.
        """
        token = secrets.token_urlsafe(32)
        with self._write() as db:
            row = db.execute("SELECT serial FROM devices WHERE id = ?", (device_id,)).fetchone()
            if row is not None and row[0] != serial:
                raise FleetError(f"device id {device_id} belongs to another device in this fleet"
                                 f"{f' (box {row[0]})' if row[0] else ' (registered with devices add)'}; give this "
                                 "box another device_id in its site configuration")
            other = db.execute("SELECT id FROM devices WHERE serial = ? AND id != ?", (serial, device_id)).fetchone()
            if other is not None:  # re-provisioned under a new name: the old name goes
                db.execute("DELETE FROM devices WHERE id = ?", (other[0],))
            if row is None:
                db.execute("INSERT INTO devices (id, token_sha256, grp, channel, created, serial) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (device_id, _hash(token), group, channel, time.time(), serial))
            else:
                db.execute("UPDATE devices SET token_sha256 = ?, grp = ?, channel = ? WHERE id = ?",
                           (_hash(token), group, channel, device_id))
        return token

    def remove_device(self, device_id: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount == 0:
                raise FleetError(f"no device {device_id} (see: appstore devices)")

    def device_for_token(self, token: str) -> str | None:
        rows = self._read("SELECT id FROM devices WHERE token_sha256 = ?", _hash(token))
        return str(rows[0][0]) if rows else None

    def add_admin_token(self, note: str = "") -> str:
        token = secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("INSERT INTO admin_tokens (token_sha256, note, created) VALUES (?, ?, ?)",
                       (_hash(token), note, time.time()))
        return token

    def is_admin_token(self, token: str) -> bool:
        return bool(self._read("SELECT 1 FROM admin_tokens WHERE token_sha256 = ?", _hash(token)))

    # reports

    def save_report(self, report: DeviceReport, received: float) -> None:
        with self._write() as db:
            db.execute("INSERT INTO reports (device, received, body) VALUES (?, ?, ?) ON CONFLICT (device) "
                       "DO UPDATE SET received = excluded.received, body = excluded.body",
                       (report.device, received, report.model_dump_json()))

    def devices(self) -> list[Device]:
        rows = self._read("SELECT d.id, d.grp, d.channel, d.created, r.received, r.body FROM devices d "
                          "LEFT JOIN reports r ON r.device = d.id ORDER BY d.id")
        out = []
        for device_id, group, channel, created, received, body in rows:
            report = None
            if body is not None:
                try:
                    report = DeviceReport.model_validate_json(body)
                except ValidationError:  # written by an older AppStore: shown as never reported
                    report = None
            out.append(Device(device_id, group, channel, created, received, report))
        return out

    def channel_of(self, device: Device) -> str:
        return device.report.channel if device.report and device.report.channel else device.channel

    # rollouts

    def start_rollout(self, channel: str, rollout_id: str, started: float) -> None:
        with self._write() as db:
            db.execute("UPDATE rollouts SET ended = ?, outcome = 'replaced' WHERE channel = ? AND ended IS NULL",
                       (started, channel))
            db.execute("INSERT OR REPLACE INTO rollouts (channel, id, started) VALUES (?, ?, ?)",
                       (channel, rollout_id, started))

    def end_rollout(self, channel: str, rollout_id: str, outcome: str, ended: float) -> None:
        with self._write() as db:
            db.execute("UPDATE rollouts SET ended = ?, outcome = ? WHERE channel = ? AND id = ? AND ended IS NULL",
                       (ended, outcome, channel, rollout_id))

    def rollouts(self) -> list[RolloutRecord]:
        rows = self._read("SELECT channel, id, started, ended, outcome FROM rollouts ORDER BY started")
        return [RolloutRecord(*row) for row in rows]

    def rollout(self, channel: str, rollout_id: str) -> RolloutRecord | None:
        return next((r for r in self.rollouts() if r.channel == channel and r.id == rollout_id), None)


    # samples (the files are the inbox's business, appstore.samples; this is their index)

    def add_sample(self, row: SampleRow, place: Callable[[], None]) -> bool:
        """Index a sample unless its device already delivered that id; False for such a duplicate.

        ``place`` moves the sample's files into place inside the transaction, so a row is never seen without
        its files and, of concurrent deliveries of one id, only the one that got the row writes them.
        """
        with self._write() as db:
            inserted = db.execute(
                "INSERT INTO samples (device, sample_id, received, reason, has_image, meta) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device, sample_id) DO NOTHING",
                (row.device, row.sample_id, row.received, row.reason, int(row.has_image), row.meta)).rowcount
            if inserted:
                place()
        return bool(inserted)

    def samples(self, device: str | None = None, reason: str | None = None, limit: int = 100) -> list[SampleRow]:
        """The newest samples first (by when they were received), optionally of one device and one reason."""
        where, args = _sample_filter(device, reason)
        rows = self._read("SELECT device, sample_id, received, reason, has_image, meta FROM samples"
                          f"{where} ORDER BY received DESC, rowid DESC LIMIT ?", *args, limit)
        return [SampleRow(d, i, received, r, bool(has_image), meta) for d, i, received, r, has_image, meta in rows]

    def sample_counts(self, device: str | None = None, reason: str | None = None) -> list[tuple[str, str, int]]:
        """How many samples each (device, reason) has, with the same filters as :meth:`samples`."""
        where, args = _sample_filter(device, reason)
        rows = self._read(f"SELECT device, reason, COUNT(*) FROM samples{where} GROUP BY device, reason "
                          "ORDER BY device, reason", *args)
        return [(str(d), str(r), int(n)) for d, r, n in rows]


def _sample_filter(device: str | None, reason: str | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    args: list[object] = []
    for column, value in (("device", device), ("reason", reason)):
        if value:
            clauses.append(f"{column} = ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
