"""The appliance's state store: one SQLite file, one writer thread, a read connection per thread.

Usage::

    from appliance.store import EventRecord, Store

    with Store(state_dir / "appliance.db") as store:   # opens, migrates, starts the writer
        store.add_event(EventRecord(id="e1", ts=now, app="ppe-watch", source="cam1",
                                    rule="no-helmet", label="person", score=0.9))
        latest = store.recent_events(limit=10)

Opening happens in the constructor (there is no separate ``open()``): when ``Store(path)`` returns,
the schema is current and the writer is running; :meth:`Store.close` (or leaving the ``with`` block)
drains pending writes and stops it. Any call after close raises :class:`StoreClosed`.

Durability: WAL journal with ``synchronous=FULL``. WAL with ``NORMAL`` already keeps every committed
transaction across a kill of the process (SIGKILL, OOM killer), but may lose the last ones on a power
cut; an unattended box in a mine or a factory loses power without warning, so every commit is synced
to disk. The cost, one fsync per write, is small at this store's write rate (config changes, events
after rule debounce and cool-down, audit lines).

Concurrency: every write is a callable run by the single writer thread inside ``BEGIN IMMEDIATE ...
COMMIT`` (rolled back if it raises); the public write methods block until it is committed and return
its result or raise its error. Reads run on a connection owned by the calling thread (``query_only``),
so they never wait for the writer, and may be called from any thread. Another process (the CLI) may
open the same file at the same time: SQLite's locks serialise the writers, and each waits up to the
busy timeout (5 s) before :class:`StoreBusy`. The methods block; call them from asyncio through
``asyncio.to_thread``.

The store records what it is told. Installing, removing, enabling and disabling models and apps are
*not* audited automatically: the caller, who knows the actor, writes the audit line with
:meth:`Store.audit` after the change succeeds.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from sqlite_utils import Database

from appliance.store.errors import (
    LastAdmin,
    ModelExists,
    ModelInUse,
    ModelMissing,
    NotFound,
    StoreClosed,
    StoreError,
    UserExists,
    translate,
)
from appliance.store.migrations import MIGRATIONS, Migration, apply_migrations
from appliance.store.records import (
    HANDLING_ACTIONS,
    LANGUAGES,
    ROLES,
    AppRecord,
    AuditRecord,
    EventRecord,
    HandlingAction,
    HandlingRecord,
    Language,
    ModelRecord,
    Role,
    SessionRecord,
    SourceRecord,
    SpooledSample,
    TokenRecord,
    UserRecord,
    app_from_row,
    audit_from_row,
    event_from_row,
    event_to_row,
    handling_from_row,
    model_from_row,
    sample_from_row,
    session_from_row,
    source_from_row,
    token_from_row,
    user_from_row,
)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another one's lock before StoreBusy
SOURCE_KINDS = ("camera", "sensor")


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[Database], T]
    future: Future[T]


class _Stop:
    """Queued by close(): everything queued before it is written first."""


_STOP = _Stop()


def _rows(db: Database, sql: str, params: Iterable[object] = ()) -> list[dict[str, Any]]:
    return list(db.query(sql, list(params)))


class Store:
    """The appliance's state: models, apps, sources, events and their handling, users, sessions, API tokens,
    the audit log, and the config generation.

    ``Store(path)`` opens (creating the file if needed) and migrates the database, and starts the writer
    thread; ``clock`` supplies timestamps (``installed_at``, audit ``ts``) and exists for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        clock: Callable[[], float] = time.time,
        migrations: tuple[Migration, ...] = MIGRATIONS,
    ) -> None:
        self._path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._clock = clock
        self._migrations = migrations
        self._lock = threading.Lock()  # guards _closed, the queue's last item, and _readers
        self._closed = False
        self._queue: SimpleQueue[_Job[Any] | _Stop] = SimpleQueue()
        self._local = threading.local()
        self._readers: list[tuple[weakref.ref[threading.Thread], Database]] = []
        self._ready: Future[None] = Future()
        self._writer = threading.Thread(target=self._run_writer, name=f"store-writer:{self._path.name}", daemon=True)
        self._writer.start()
        try:
            self._ready.result()
        except BaseException:
            self._closed = True
            self._writer.join()
            raise

    @classmethod
    def open(cls, path: Path) -> Store:
        """Same as ``Store(path)``; reads better at call sites that do not use ``with``."""
        return cls(path)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self._path)!r}{', closed' if self._closed else ''})"

    # ---- connections ------------------------------------------------------------------------------

    def _connect(self, *, reader: bool) -> Database:
        # isolation_level=None: the sqlite3 module opens no implicit transactions; we issue BEGIN ourselves.
        conn = sqlite3.connect(
            str(self._path),
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=not reader,  # a reader may be closed by close() from another thread
        )
        try:
            db = Database(conn, execute_plugins=False)
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = FULL")
            if reader:
                db.execute("PRAGMA query_only = ON")
            else:
                db.enable_wal()  # persistent in the file; a no-op when it already is WAL
        except BaseException:
            conn.close()
            raise
        return db

    def _reader(self) -> Database:
        db: Database | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._prune_readers()
            db = self._connect(reader=True)
            self._readers.append((weakref.ref(threading.current_thread()), db))
        self._local.db = db
        return db

    def _prune_readers(self) -> None:
        """Close the connections of threads that have ended (called with the lock held)."""
        alive = []
        for ref, db in self._readers:
            thread = ref()
            if thread is not None and thread.is_alive():
                alive.append((ref, db))
            else:
                db.close()
        self._readers = alive

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(f"the state store {self._path} is closed; open a new Store to use it again")

    def _read(self, fn: Callable[[Database], T]) -> T:
        if self._closed:
            raise self._closed_error()
        try:
            return fn(self._reader())
        except sqlite3.Error as e:
            if self._closed:
                raise self._closed_error() from e
            raise translate(e, self._path) from e

    # ---- the writer -------------------------------------------------------------------------------

    def _run_writer(self) -> None:
        try:
            db = self._connect(reader=False)
        except BaseException as e:  # noqa: BLE001 - raised in the constructor's thread through the future
            self._ready.set_exception(translate(e, self._path) if isinstance(e, sqlite3.Error) else e)
            return
        try:
            try:
                apply_migrations(db, self._path, self._migrations)
            except BaseException as e:  # noqa: BLE001 - raised in the constructor's thread through the future
                self._ready.set_exception(translate(e, self._path) if isinstance(e, sqlite3.Error) else e)
                return
            self._ready.set_result(None)
            while True:
                job = self._queue.get()
                if isinstance(job, _Stop):
                    return
                self._run_job(db, job)
        finally:
            db.close()

    def _run_job(self, db: Database, job: _Job[Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            result = job.fn(db)
            db.execute("COMMIT")
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread through the future
            if db.conn.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the original error says more
            job.future.set_exception(translate(e, self._path) if isinstance(e, sqlite3.Error) else e)
        else:
            job.future.set_result(result)

    def _write(self, fn: Callable[[Database], T]) -> T:
        """Run ``fn`` in one transaction on the writer thread; block until committed; return its result."""
        if threading.current_thread() is self._writer:
            raise StoreError("a store write was started from inside another write; this would deadlock")
        job: _Job[T] = _Job(fn, Future())
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Write what is queued, stop the writer and close every connection. Safe to call more than once."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is not self._writer:
            self._writer.join()
        with self._lock:
            for _, db in self._readers:
                db.close()
            self._readers = []

    # ---- models -----------------------------------------------------------------------------------

    def add_model(
        self, card_json: str, name: str, version: str, task: str, sha256: str, size_bytes: int, path: str
    ) -> None:
        """Record an installed model package. Raises :class:`ModelExists` if ``name@version`` is installed."""
        _check_json(card_json, f"model {name}@{version}: card")
        if size_bytes < 0:
            raise ValueError(f"model {name}@{version}: size_bytes must not be negative ({size_bytes})")
        installed_at = self._clock()

        def write(db: Database) -> None:
            if _rows(db, "SELECT 1 FROM models WHERE name = ? AND version = ?", (name, version)):
                raise ModelExists(name, version)
            db.execute(
                "INSERT INTO models (name, version, task, sha256, size_bytes, path, card, installed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, task, sha256, size_bytes, path, card_json, installed_at),
            )

        self._write(write)

    def get_model(self, name: str, version: str) -> ModelRecord | None:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM models WHERE name = ? AND version = ?", (name, version)))
        return model_from_row(rows[0]) if rows else None

    def list_models(self) -> list[ModelRecord]:
        """Every installed model, by name then installation time."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM models ORDER BY name, installed_at, version"))
        return [model_from_row(r) for r in rows]

    def remove_model(self, name: str, version: str) -> ModelRecord:
        """Forget a model and return its record (the caller deletes its files).

        Raises :class:`NotFound` if it is not installed and :class:`ModelInUse` if an app uses it.
        """

        def write(db: Database) -> ModelRecord:
            rows = _rows(db, "SELECT * FROM models WHERE name = ? AND version = ?", (name, version))
            if not rows:
                raise NotFound(f"model {name}@{version} is not installed")
            users = _rows(
                db, "SELECT name FROM apps WHERE model_name = ? AND model_version = ? ORDER BY name", (name, version)
            )
            if users:
                raise ModelInUse(name, version, [str(u["name"]) for u in users])
            db.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
            return model_from_row(rows[0])

        return self._write(write)

    # ---- apps -------------------------------------------------------------------------------------

    def add_app(self, manifest_json: str, name: str, version: str, model_name: str, model_version: str) -> None:
        """Install an app, or upgrade the installed app of that name (keeping its enabled flag).

        A new app starts enabled. Raises :class:`ModelMissing` if ``model_name@model_version`` is not installed.
        """
        _check_json(manifest_json, f"app {name}@{version}: manifest")
        installed_at = self._clock()

        def write(db: Database) -> None:
            if not _rows(db, "SELECT 1 FROM models WHERE name = ? AND version = ?", (model_name, model_version)):
                raise ModelMissing(name, model_name, model_version)
            db.execute(
                "INSERT INTO apps (name, version, model_name, model_version, manifest, enabled, installed_at)"
                " VALUES (?, ?, ?, ?, ?, 1, ?)"
                " ON CONFLICT (name) DO UPDATE SET version = excluded.version, model_name = excluded.model_name,"
                " model_version = excluded.model_version, manifest = excluded.manifest,"
                " installed_at = excluded.installed_at,"
                " previous_manifest = CASE WHEN apps.manifest = excluded.manifest THEN apps.previous_manifest"
                " ELSE apps.manifest END",
                (name, version, model_name, model_version, manifest_json, installed_at),
            )

        self._write(write)

    def get_app(self, name: str) -> AppRecord | None:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM apps WHERE name = ?", (name,)))
        return app_from_row(rows[0]) if rows else None

    def list_apps(self) -> list[AppRecord]:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM apps ORDER BY name"))
        return [app_from_row(r) for r in rows]

    def remove_app(self, name: str) -> AppRecord:
        """Uninstall an app and return its record. Raises :class:`NotFound` if it is not installed."""

        def write(db: Database) -> AppRecord:
            rows = _rows(db, "SELECT * FROM apps WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"app {name} is not installed")
            db.execute("DELETE FROM apps WHERE name = ?", (name,))
            return app_from_row(rows[0])

        return self._write(write)

    # hard samples: the spool's index (the frames are files beside it, see appliance.samples.spool)

    def add_sample(self, sample: SpooledSample, quota_bytes: int, quota_count: int) -> tuple[bool, list[str]]:
        """Queue ``sample`` within the quota, dropping lower-value queued samples first (lowest priority,
        then oldest). Returns whether it was kept, and the ids dropped (their files are the caller's to
        delete); every drop is counted by reason."""

        def write(db: Database) -> tuple[bool, list[str]]:
            kept, dropped = _make_room(db, quota_bytes, quota_count, sample.bytes, sample.priority)
            if kept:
                db.execute("INSERT INTO samples (id, ts, app, source, reason, priority, bytes, meta_json) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (sample.id, sample.ts, sample.app, sample.source, sample.reason, sample.priority,
                            sample.bytes, sample.meta_json))
            else:
                _count_drop(db, sample.reason)
            return kept, dropped

        return self._write(write)

    def enforce_sample_quota(self, quota_bytes: int, quota_count: int) -> list[str]:
        """Drop the least valuable queued samples until the queue fits the quota (a lowered quota, at start);
        the ids dropped, whose files are the caller's to delete. Every drop is counted by reason."""
        return self._write(lambda db: _make_room(db, quota_bytes, quota_count, 0, None)[1])

    def sample_dropped(self, reason: str) -> None:
        """Count a sample that was not kept at all (no room on the disk)."""
        self._write(lambda db: _count_drop(db, reason))

    def queued_samples(self, limit: int) -> list[SpooledSample]:
        """The next samples to upload: the most valuable first, then the oldest."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM samples WHERE state = 'queued' "
                                               "ORDER BY priority DESC, ts LIMIT ?", (limit,)))
        return [sample_from_row(r) for r in rows]

    def sample_uploaded(self, sample_id: str) -> None:
        self._write(lambda db: db.execute("UPDATE samples SET state = 'uploaded', uploaded = ?, "
                                          "attempts = attempts + 1 WHERE id = ?", (time.time(), sample_id)))

    def sample_refused(self, sample_id: str, reason: str) -> None:
        """The AppStore refused the record as malformed: it is not sent again; the reason is kept for the page."""
        self._write(lambda db: db.execute("UPDATE samples SET state = 'refused', refused_reason = ?, "
                                          "attempts = attempts + 1 WHERE id = ?", (reason, sample_id)))

    def sample_attempted(self, sample_id: str) -> None:
        self._write(lambda db: db.execute("UPDATE samples SET attempts = attempts + 1 WHERE id = ?",
                                          (sample_id,)))

    def sample_counts(self) -> dict[str, Any]:
        """Per reason: queued and uploaded counts and queued bytes; and the drops by reason."""

        def read(db: Database) -> dict[str, Any]:
            by: dict[str, dict[str, int]] = {}
            for reason, state, n, size in db.execute(
                    "SELECT reason, state, COUNT(*), COALESCE(SUM(bytes), 0) FROM samples GROUP BY reason, state"):
                entry = by.setdefault(reason, {"queued": 0, "uploaded": 0, "refused": 0, "queued_bytes": 0})
                entry[state] = n
                if state == "queued":
                    entry["queued_bytes"] = size
            drops = {r: n for r, n in db.execute("SELECT reason, count FROM sample_drops")}
            return {"by_reason": by, "dropped": drops}

        return self._read(read)

    def recent_samples(self, limit: int = 50) -> list[SpooledSample]:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM samples ORDER BY ts DESC LIMIT ?", (limit,)))
        return [sample_from_row(r) for r in rows]

    def queued_sample_ids(self) -> set[str]:
        """The samples whose frames are still on disk (uploaded and refused ones have left it)."""
        return {str(r["id"]) for r in self._read(lambda db: _rows(db, "SELECT id FROM samples WHERE state = 'queued'",
                                                                  ()))}

    def prune_uploaded_samples(self, older_than_ts: float) -> int:
        return self._write(lambda db: db.execute("DELETE FROM samples WHERE state IN ('uploaded', 'refused') "
                                                 "AND COALESCE(uploaded, ts) < ?",
                                                 (older_than_ts,)).rowcount)

    # subscriptions: apps from the AppStore that the site asked for, beside its channel's

    def subscribe(self, app: str, user: str) -> bool:
        """Subscribe to an AppStore app; False if it was already subscribed."""

        def write(db: Database) -> bool:
            cur = db.execute("INSERT OR IGNORE INTO subscriptions (app, user, created) VALUES (?, ?, ?)",
                             (app, user, time.time()))
            return bool(cur.rowcount)

        return self._write(write)

    def unsubscribe(self, app: str) -> bool:
        """False if it was not subscribed. The installed app stays until removed."""
        return self._write(lambda db: bool(db.execute("DELETE FROM subscriptions WHERE app = ?", (app,)).rowcount))

    def subscriptions(self) -> list[str]:
        rows = self._read(lambda db: _rows(db, "SELECT app FROM subscriptions ORDER BY app", ()))
        return [str(r["app"]) for r in rows]

    def set_app_enabled(self, name: str, enabled: bool) -> AppRecord:
        """Enable or disable an app and return its new record; no change (and no reload) if already so.

        Raises :class:`NotFound` if the app is not installed.
        """

        def write(db: Database) -> AppRecord:
            rows = _rows(db, "SELECT * FROM apps WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"app {name} is not installed")
            if bool(rows[0]["enabled"]) != enabled:
                db.execute("UPDATE apps SET enabled = ? WHERE name = ?", (int(enabled), name))
                rows = _rows(db, "SELECT * FROM apps WHERE name = ?", (name,))
            return app_from_row(rows[0])

        return self._write(write)

    def config_generation(self) -> int:
        """A number that grows on every change to models or apps: poll it to know when to reload."""
        rows = self._read(lambda db: _rows(db, "SELECT value FROM meta WHERE key = 'config_generation'"))
        return int(rows[0]["value"]) if rows else 0

    # ---- sources ----------------------------------------------------------------------------------

    def touch_sources(self, rows: list[tuple[str, str, float]]) -> None:
        """Record sources as seen: ``(id, kind, last_seen)``; ``first_seen`` is set on the first sighting."""
        for source_id, kind, _ in rows:
            if kind not in SOURCE_KINDS:
                raise ValueError(f"source {source_id}: kind must be 'camera' or 'sensor', not {kind!r}")
        if not rows:
            return
        params = [(source_id, kind, float(seen), float(seen)) for source_id, kind, seen in rows]

        def write(db: Database) -> None:
            db.conn.executemany(
                "INSERT INTO sources (id, kind, first_seen, last_seen) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET kind = excluded.kind,"
                " last_seen = max(last_seen, excluded.last_seen)",
                params,
            )

        self._write(write)

    def list_sources(self) -> list[SourceRecord]:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM sources ORDER BY id"))
        return [source_from_row(r) for r in rows]

    # ---- events -----------------------------------------------------------------------------------

    def add_event(self, event: EventRecord) -> None:
        """Store an event. Raises :class:`StoreError` if an event with the same id is already stored."""
        event.check()
        row = event_to_row(event)

        def write(db: Database) -> None:
            if _rows(db, "SELECT 1 FROM events WHERE id = ?", (event.id,)):
                raise StoreError(f"event {event.id} is already stored; event ids must be unique")
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            db.execute(f"INSERT INTO events ({columns}) VALUES ({marks})", list(row.values()))

        self._write(write)

    def recent_events(
        self,
        limit: int = 50,
        app: str | None = None,
        source: str | None = None,
        label: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[EventRecord]:
        """The newest ``limit`` events, newest first, optionally only those of one app, source and/or label,
        and with ``since <= ts < until`` (epoch seconds)."""
        where: list[str] = []
        params: list[object] = []
        for column, value in (("app", app), ("source", source), ("label", label)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("ts >= ?")
            params.append(float(since))
        if until is not None:
            where.append("ts < ?")
            params.append(float(until))
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        sql = f"SELECT * FROM events {clause}ORDER BY ts DESC, rowid DESC LIMIT ?"
        rows = self._read(lambda db: _rows(db, sql, [*params, max(0, int(limit))]))
        return [event_from_row(r) for r in rows]

    def get_event(self, event_id: str) -> EventRecord | None:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM events WHERE id = ?", (event_id,)))
        return event_from_row(rows[0]) if rows else None

    def event_totals(self) -> tuple[int, int]:
        """``(number of events, total snapshot bytes)``."""
        rows = self._read(
            lambda db: _rows(db, "SELECT count(*) AS n, coalesce(sum(snapshot_bytes), 0) AS bytes FROM events")
        )
        return int(rows[0]["n"]), int(rows[0]["bytes"])

    def prune_events(self, older_than_ts: float, max_snapshot_bytes: int) -> list[EventRecord]:
        """Remove events with ``ts`` before ``older_than_ts``, then the oldest ones until the snapshot bytes
        total is at most ``max_snapshot_bytes``. Returns the removed events, oldest first; the caller deletes
        their snapshot files (after this returns, so a crash leaves files without rows, never the reverse).
        """
        if max_snapshot_bytes < 0:
            raise ValueError(f"max_snapshot_bytes must not be negative ({max_snapshot_bytes})")

        def write(db: Database) -> list[EventRecord]:
            removed = [
                event_from_row(r)
                for r in _rows(db, "SELECT * FROM events WHERE ts < ? ORDER BY ts, rowid", (older_than_ts,))
            ]
            db.execute("DELETE FROM events WHERE ts < ?", (older_than_ts,))
            total = int(db.execute("SELECT coalesce(sum(snapshot_bytes), 0) FROM events").fetchone()[0])
            over: list[EventRecord] = []
            if total > max_snapshot_bytes:
                cursor = db.execute("SELECT * FROM events ORDER BY ts, rowid")
                keys = [d[0] for d in cursor.description]
                try:
                    while total > max_snapshot_bytes and (row := cursor.fetchone()) is not None:
                        event = event_from_row(dict(zip(keys, row)))
                        over.append(event)
                        total -= event.snapshot_bytes
                finally:
                    cursor.close()
                db.conn.executemany("DELETE FROM events WHERE id = ?", [(e.id,) for e in over])
                removed.extend(over)
            return removed

        return self._write(write)

    # ---- event handling ---------------------------------------------------------------------------

    def add_handling(self, event_id: str, action: HandlingAction, user: str, note: str = "") -> HandlingRecord:
        """Record what ``user`` did about an event, now. Raises :class:`NotFound` if the event is not stored
        (never stored, or removed by retention)."""
        if action not in HANDLING_ACTIONS:
            raise ValueError(f"handling action must be one of {', '.join(HANDLING_ACTIONS)}, not {action!r}")
        ts = self._clock()

        def write(db: Database) -> HandlingRecord:
            if not _rows(db, "SELECT 1 FROM events WHERE id = ?", (event_id,)):
                raise NotFound(f"event {event_id} is not stored (it may have been removed by retention)")
            cursor = db.execute(
                "INSERT INTO event_handling (event_id, action, user, ts, note) VALUES (?, ?, ?, ?, ?)",
                (event_id, action, user, ts, note),
            )
            return HandlingRecord(int(cursor.lastrowid or 0), event_id, action, user, ts, note)

        return self._write(write)

    def event_handling(self, event_ids: Sequence[str]) -> dict[str, list[HandlingRecord]]:
        """The handling of each of ``event_ids``, oldest first; events with none are left out."""
        out: dict[str, list[HandlingRecord]] = {}
        ids = list(dict.fromkeys(event_ids))
        for start in range(0, len(ids), 500):  # stay well under SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            sql = f"SELECT * FROM event_handling WHERE event_id IN ({marks}) ORDER BY ts, id"
            for row in self._read(functools.partial(_rows, sql=sql, params=chunk)):
                record = handling_from_row(row)
                out.setdefault(record.event_id, []).append(record)
        return out

    # ---- users ------------------------------------------------------------------------------------

    def add_user(self, name: str, role: Role, password_hash: str, language: Language = "en") -> UserRecord:
        """Add a console user. Raises :class:`UserExists` if the name (compared without case) is taken."""
        _check_user_fields(role, language)
        created = self._clock()

        def write(db: Database) -> UserRecord:
            if _rows(db, "SELECT 1 FROM users WHERE name = ?", (name,)):
                raise UserExists(name)
            db.execute(
                "INSERT INTO users (name, role, password_hash, language, created, disabled) VALUES (?, ?, ?, ?, ?, 0)",
                (name, role, password_hash, language, created),
            )
            return UserRecord(name, role, password_hash, language, created, False)

        return self._write(write)

    def get_user(self, name: str) -> UserRecord | None:
        """The user of that name, compared without case."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM users WHERE name = ?", (name,)))
        return user_from_row(rows[0]) if rows else None

    def list_users(self) -> list[UserRecord]:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM users ORDER BY name"))
        return [user_from_row(r) for r in rows]

    def user_count(self) -> int:
        rows = self._read(lambda db: _rows(db, "SELECT count(*) AS n FROM users"))
        return int(rows[0]["n"])

    def update_user(
        self,
        name: str,
        *,
        role: Role | None = None,
        password_hash: str | None = None,
        language: Language | None = None,
        disabled: bool | None = None,
        end_sessions: bool = False,
        keep_session: str | None = None,
    ) -> UserRecord:
        """Change a user and return the new record; with ``end_sessions`` also end their sessions (all but
        the one whose hash is ``keep_session``) in the same transaction.

        Raises :class:`NotFound`, and :class:`LastAdmin` if no enabled admin would be left.
        """
        _check_user_fields(role, language)

        def write(db: Database) -> UserRecord:
            rows = _rows(db, "SELECT * FROM users WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"no user named {name!r}")
            old = user_from_row(rows[0])
            new_role = role or old.role
            new_disabled = old.disabled if disabled is None else disabled
            if old.role == "admin" and not old.disabled and (new_role != "admin" or new_disabled):
                _check_other_admin(db, old.name, "disabled" if new_disabled else f"made {new_role}")
            db.execute(
                "UPDATE users SET role = ?, password_hash = ?, language = ?, disabled = ? WHERE name = ?",
                (new_role, password_hash or old.password_hash, language or old.language, int(new_disabled), old.name),
            )
            if end_sessions or new_disabled:
                db.execute(
                    "DELETE FROM sessions WHERE user = ? AND id_hash != ?", (old.name, keep_session or "")
                )
            return user_from_row(_rows(db, "SELECT * FROM users WHERE name = ?", (old.name,))[0])

        return self._write(write)

    def remove_user(self, name: str) -> UserRecord:
        """Remove a user with their sessions and API tokens; their handling and audit lines stay.

        Raises :class:`NotFound`, and :class:`LastAdmin` for the last enabled admin.
        """

        def write(db: Database) -> UserRecord:
            rows = _rows(db, "SELECT * FROM users WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"no user named {name!r}")
            old = user_from_row(rows[0])
            if old.role == "admin" and not old.disabled:
                _check_other_admin(db, old.name, "removed")
            db.execute("DELETE FROM users WHERE name = ?", (old.name,))
            return old

        return self._write(write)

    # ---- sessions ---------------------------------------------------------------------------------

    def add_session(self, session: SessionRecord) -> None:
        """Store a new session, and forget every session that has expired by its creation time."""

        def write(db: Database) -> None:
            db.execute("DELETE FROM sessions WHERE expires <= ?", (session.created,))
            db.execute(
                "INSERT INTO sessions (id_hash, user, csrf_token, created, expires, address) VALUES (?, ?, ?, ?, ?, ?)",
                (session.id_hash, session.user, session.csrf_token, session.created, session.expires, session.address),
            )

        self._write(write)

    def get_session(self, id_hash: str) -> tuple[SessionRecord, UserRecord] | None:
        """The session with that hash and its user, expired or not (the caller compares ``expires``)."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM sessions WHERE id_hash = ?", (id_hash,)))
        if not rows:
            return None
        session = session_from_row(rows[0])
        user = self.get_user(session.user)
        return None if user is None else (session, user)

    def remove_session(self, id_hash: str) -> SessionRecord | None:
        """End a session; returns it, or None if there was none."""

        def write(db: Database) -> SessionRecord | None:
            rows = _rows(db, "SELECT * FROM sessions WHERE id_hash = ?", (id_hash,))
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash,))
            return session_from_row(rows[0]) if rows else None

        return self._write(write)

    # ---- API tokens -------------------------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:
        """Store an API token (its hash). Raises :class:`NotFound` if its user does not exist."""

        def write(db: Database) -> None:
            if not _rows(db, "SELECT 1 FROM users WHERE name = ?", (token.user,)):
                raise NotFound(f"no user named {token.user!r}")
            db.execute(
                "INSERT INTO api_tokens (id, name, user, token_hash, created, last_used) VALUES (?, ?, ?, ?, ?, NULL)",
                (token.id, token.name, token.user, token.token_hash, token.created),
            )

        self._write(write)

    def find_token(self, token_hash: str) -> tuple[TokenRecord, UserRecord] | None:
        """The token with that hash and its user."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM api_tokens WHERE token_hash = ?", (token_hash,)))
        if not rows:
            return None
        token = token_from_row(rows[0])
        user = self.get_user(token.user)
        return None if user is None else (token, user)

    def list_tokens(self) -> list[TokenRecord]:
        rows = self._read(lambda db: _rows(db, "SELECT * FROM api_tokens ORDER BY user, created, id"))
        return [token_from_row(r) for r in rows]

    def remove_token(self, token_id: str) -> TokenRecord:
        """Revoke a token. Raises :class:`NotFound` if there is none with that id."""

        def write(db: Database) -> TokenRecord:
            rows = _rows(db, "SELECT * FROM api_tokens WHERE id = ?", (token_id,))
            if not rows:
                raise NotFound(f"no API token with id {token_id!r} (see GET /api/v1/tokens)")
            db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,))
            return token_from_row(rows[0])

        return self._write(write)

    def touch_token(self, token_id: str, ts: float) -> None:
        """Record when a token was last used."""
        self._write(lambda db: db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (ts, token_id)))

    # ---- audit ------------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, detail: dict[str, object], address: str | None = None) -> None:
        """Append a line to the audit log: who, what, from where (a client address, ``local``), now.
        ``detail`` is stored as JSON (values JSON cannot hold as text). Never put a secret in it."""
        text = json.dumps(detail, sort_keys=True, default=str)
        ts = self._clock()

        def write(db: Database) -> None:
            db.execute(
                "INSERT INTO audit_log (ts, actor, action, detail, address) VALUES (?, ?, ?, ?, ?)",
                (ts, actor, action, text, address),
            )

        self._write(write)

    def recent_audit(self, limit: int = 50) -> list[AuditRecord]:
        """The newest ``limit`` audit lines, newest first."""
        rows = self._read(lambda db: _rows(db, "SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (max(0, limit),)))
        return [audit_from_row(r) for r in rows]


def _check_user_fields(role: str | None, language: str | None) -> None:
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"language must be one of {', '.join(LANGUAGES)}, not {language!r}")


def _check_other_admin(db: Database, name: str, change: str) -> None:
    """Raise LastAdmin unless an enabled admin other than ``name`` exists."""
    others = _rows(db, "SELECT 1 FROM users WHERE role = 'admin' AND disabled = 0 AND name != ? LIMIT 1", (name,))
    if not others:
        raise LastAdmin(name, change)


def _check_json(text: str, what: str) -> None:
    try:
        json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from e


def _count_drop(db: Database, reason: str) -> None:
    db.execute("INSERT INTO sample_drops (reason, count) VALUES (?, 1) "
               "ON CONFLICT (reason) DO UPDATE SET count = count + 1", (reason,))


def _make_room(db: Database, quota_bytes: int, quota_count: int, size: int,
               priority: int | None) -> tuple[bool, list[str]]:
    """Drop queued samples, least valuable (lowest priority, then oldest) first, until one more of ``size``
    bytes fits (``size`` 0 and ``priority`` None: until the queue itself fits). Never drops one worth more
    than ``priority``: then the newcomer is not kept. Returns (room made, ids dropped); drops are counted."""
    total, count = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM samples "
                              "WHERE state = 'queued'").fetchone()
    extra = 0 if priority is None else 1
    if priority is not None:
        cheaper_bytes, cheaper = db.execute("SELECT COALESCE(SUM(bytes), 0), COUNT(*) FROM samples "
                                            "WHERE state = 'queued' AND priority <= ?", (priority,)).fetchone()
        if total - cheaper_bytes + size > quota_bytes or count - cheaper + 1 > quota_count:
            return False, []  # everything it could displace is not room enough: nothing is dropped for it
    dropped: list[str] = []
    while total + size > quota_bytes or count + extra > quota_count:
        victim = db.execute("SELECT id, reason, bytes, priority FROM samples WHERE state = 'queued' "
                            "ORDER BY priority, ts LIMIT 1").fetchone()
        if victim is None:
            break
        db.execute("DELETE FROM samples WHERE id = ?", (victim[0],))
        _count_drop(db, victim[1])
        dropped.append(victim[0])
        total, count = total - victim[2], count - 1
    return True, dropped
