"""Versioned schema migrations, applied in order at open; the version lives in ``PRAGMA user_version``.

A migration is a version number and either an SQL script or a callable taking the sqlite-utils
``Database``. Each runs in its own ``BEGIN IMMEDIATE`` transaction together with the ``user_version``
bump, so a failed migration leaves the database at the previous version, and two processes opening a
fresh file at once (daemon and CLI) apply each migration exactly once. Never edit a released migration:
append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from appliance.store.errors import SchemaTooNew, StoreError, translate

MigrationStep = str | Callable[[Database], None]


@dataclass(slots=True, frozen=True)
class Migration:
    version: int
    step: MigrationStep
    description: str = ""


# config_generation is bumped by triggers, so any change to models or apps, by any code path, is seen
# by the daemon polling that one value.
def _bump_triggers(key: str, suffix: str, tables: tuple[str, ...], ops: tuple[str, ...]) -> str:
    return "\n".join(
        f"""
CREATE TRIGGER {table}_{op.lower().replace(" ", "_").replace(",", "")}_{suffix} AFTER {op} ON {table}
BEGIN
    UPDATE meta SET value = value + 1 WHERE key = '{key}';
END;"""
        for table in tables
        for op in ops
    )


_GENERATION_TRIGGERS = _bump_triggers("config_generation", "bumps_generation", ("models", "apps"),
                                      ("INSERT", "UPDATE", "DELETE"))

_V1 = (
    """
CREATE TABLE models (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    task TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL CHECK (size_bytes >= 0),
    path TEXT NOT NULL,
    card TEXT NOT NULL,
    installed_at REAL NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE apps (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    manifest TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    installed_at REAL NOT NULL,
    FOREIGN KEY (model_name, model_version) REFERENCES models (name, version) ON DELETE RESTRICT
);
CREATE INDEX apps_model ON apps (model_name, model_version);

CREATE TABLE sources (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('camera', 'sensor')),
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    app TEXT NOT NULL,
    source TEXT NOT NULL,
    rule TEXT NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    box TEXT,
    snapshot TEXT,
    snapshot_bytes INTEGER NOT NULL DEFAULT 0 CHECK (snapshot_bytes >= 0),
    created REAL NOT NULL
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_app_ts ON events (app, ts);
CREATE INDEX events_source_ts ON events (source, ts);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value
);
INSERT INTO meta (key, value) VALUES ('config_generation', 0);
"""
    + _GENERATION_TRIGGERS
)

# v2: the manifest an app had before its last upgrade, so it can be rolled back
_V2 = "ALTER TABLE apps ADD COLUMN previous_manifest TEXT;"

# v3: console accounts and alert handling. Users are named without regard to case; their sessions and
# tokens go with them, but handling keeps the name of whoever did it (history outlives the account).
# Handling goes with its event when retention removes the event.
_V3 = """
CREATE TABLE users (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash TEXT NOT NULL,
    language TEXT NOT NULL DEFAULT 'en' CHECK (language IN ('en', 'zh')),
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    last_used REAL
);
CREATE INDEX api_tokens_user ON api_tokens (user);

CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    address TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user ON sessions (user);
CREATE INDEX sessions_expires ON sessions (expires);

CREATE TABLE event_handling (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    action TEXT NOT NULL CHECK (action IN ('acknowledged', 'false_positive', 'missed_detection', 'note')),
    user TEXT NOT NULL,
    ts REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX event_handling_event ON event_handling (event_id, ts);

CREATE INDEX events_label_ts ON events (label, ts);

ALTER TABLE audit_log ADD COLUMN address TEXT;
"""

_V4 = """
CREATE TABLE subscriptions (
    app TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    created REAL NOT NULL
);
"""

_V5 = """
CREATE TABLE samples (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    app TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    meta_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'uploaded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    uploaded REAL
);
CREATE INDEX samples_queue ON samples (state, priority, ts);

CREATE TABLE sample_drops (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""

# A sample the AppStore refused as malformed is kept in the index with the AppStore's reason (SQLite cannot
# alter a CHECK constraint, so the table is rebuilt, as its documentation's twelve steps describe)
_V6 = """
CREATE TABLE samples_v6 (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    app TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    meta_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'uploaded', 'refused')),
    attempts INTEGER NOT NULL DEFAULT 0,
    uploaded REAL,
    refused_reason TEXT NOT NULL DEFAULT ''
);
INSERT INTO samples_v6 (id, ts, app, source, reason, priority, bytes, meta_json, state, attempts, uploaded)
    SELECT id, ts, app, source, reason, priority, bytes, meta_json, state, attempts, uploaded FROM samples;
DROP TABLE samples;
ALTER TABLE samples_v6 RENAME TO samples;
CREATE INDEX samples_queue ON samples (state, priority, ts);
"""

_V7 = """
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('camera', 'sensor')),
    auth TEXT NOT NULL CHECK (auth IN ('certificate', 'password')),
    created REAL NOT NULL,
    cert_serial TEXT NOT NULL DEFAULT '',
    expires REAL,
    password_hash TEXT NOT NULL DEFAULT '',
    revoked REAL,
    last_connect REAL,
    refusals INTEGER NOT NULL DEFAULT 0,
    last_refusal TEXT NOT NULL DEFAULT '',
    last_refusal_ts REAL
);
CREATE TABLE revoked_certificates (
    serial TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    revoked REAL NOT NULL
);
INSERT INTO meta (key, value) VALUES ('devices_generation', 0);
""" + _bump_triggers("devices_generation", "bumps_devices_generation", ("devices", "revoked_certificates"),
                     ("INSERT", "DELETE")) + _bump_triggers(
    "devices_generation", "bumps_devices_generation", ("devices",), ("UPDATE OF cert_serial, password_hash, revoked",))

_V8 = """
ALTER TABLE devices ADD COLUMN last_message REAL;
CREATE TABLE refused_connections (
    address TEXT NOT NULL,
    listener TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    first REAL NOT NULL,
    last REAL NOT NULL,
    hint TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (address, listener, reason)
);
CREATE INDEX refused_connections_last ON refused_connections (last);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, _V1, "models, apps, sources, events, audit log, meta"),
    Migration(2, _V2, "apps.previous_manifest for rollback"),
    Migration(3, _V3, "users, API tokens, sessions, event handling, audit_log.address"),
    Migration(4, _V4, "subscriptions: AppStore apps the site asked for"),
    Migration(5, _V5, "hard samples: the spool's index and its drops"),
    Migration(6, _V6, "samples the AppStore refused, with its reason"),
    Migration(7, _V7, "device access: cameras' and sensors' credentials, revoked certificates"),
    Migration(8, _V8, "device access: each device's last message, connections refused before the device was known"),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def user_version(db: Database) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def check_order(migrations: Sequence[Migration]) -> None:
    """Raise ValueError unless versions are 1, 2, 3, ... in order (a programming error, caught by tests)."""
    for expected, m in enumerate(migrations, start=1):
        if m.version != expected:
            raise ValueError(f"migration versions must be 1, 2, 3, ... in order; found {m.version} at {expected}")


def apply_migrations(db: Database, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring ``db`` (whose file is ``path``, for messages) up to the last migration; return the version.

    The connection must use explicit transaction control (``isolation_level=None``). Raises
    :class:`SchemaTooNew` if the file is newer than ``migrations``; a failing step is rolled back and
    raised as :class:`StoreError` naming the version.
    """
    check_order(migrations)
    latest = migrations[-1].version if migrations else 0
    found = user_version(db)
    if found > latest:
        raise SchemaTooNew(path, found, latest)
    for migration in migrations:
        if migration.version <= found:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            # re-read under the write lock: another process may have migrated meanwhile
            found = user_version(db)
            if found > latest:
                raise SchemaTooNew(path, found, latest)
            if migration.version > found:
                if isinstance(migration.step, str):
                    db.executescript(migration.step)
                else:
                    migration.step(db)
                db.execute(f"PRAGMA user_version = {int(migration.version)}")
                found = migration.version
            db.execute("COMMIT")
        except BaseException as e:
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, StoreError) or not isinstance(e, Exception):
                raise
            if isinstance(e, sqlite3.Error):
                specific = translate(e, path)
                if type(specific) is not StoreError:  # busy, corrupt, closed: say that, not "migration failed"
                    raise specific from e
            raise StoreError(
                f"{path}: schema migration {migration.version} failed and was rolled back "
                f"(the database stays at version {found}): {e}"
            ) from e
    return found
