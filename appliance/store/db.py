"""The appliance's state store: one SQLite file, one writer thread, a read connection per thread.

Usage::

    from appliance.store import EventRecord, Store

    with Store(state_dir / "appliance.db") as store:   # opens, migrates, starts the writer
        store.events.add(EventRecord(id="e1", ts=now, app="ppe-watch", source="cam1",
                                     rule="no-helmet", label="person", score=0.9))
        latest = store.events.recent(limit=10)

``Store`` owns the file, the writer and the read connections; the methods are grouped by concern, one
attribute each (as sqlite-utils keeps ``Database`` and ``Table`` apart): ``store.models``, ``store.apps``,
``store.subscriptions``, ``store.sources``, ``store.events``, ``store.handling``, ``store.users``,
``store.sessions``, ``store.tokens``, ``store.audit_log`` and ``store.samples``. Only
:meth:`Store.config_generation`, which counts changes to both models and apps, is on the store itself.

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
``store.audit_log.add`` after the change succeeds.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from sqlite_utils import Database

from appliance.store._table import select
from appliance.store.accounts import Sessions, Tokens, Users
from appliance.store.apps import Apps, Subscriptions
from appliance.store.audit import AuditLog
from appliance.store.devices import Devices
from appliance.store.errors import StoreClosed, StoreError, translate
from appliance.store.events import Events, Handling
from appliance.store.migrations import MIGRATIONS, Migration, apply_migrations
from appliance.store.models import Models
from appliance.store.samples import Samples
from appliance.store.sources import Sources

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000  # how long a connection waits for another one's lock before StoreBusy


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[Database], T]
    future: Future[T]


class _Stop:
    """Queued by close(): everything queued before it is written first."""


_STOP = _Stop()


class Store:
    """The appliance's state: models, apps, sources, events and their handling, users, sessions, API tokens,
    the audit log, hard samples, and the config generation. The store holds the connections and the writer;
    each concern's methods are on one of its attributes (``store.events.add(...)``), all sharing that writer.

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
        self.models = Models(self)
        self.apps = Apps(self)
        self.subscriptions = Subscriptions(self)
        self.sources = Sources(self)
        self.events = Events(self)
        self.handling = Handling(self)
        self.users = Users(self)
        self.sessions = Sessions(self)
        self.tokens = Tokens(self)
        self.audit_log = AuditLog(self)
        self.samples = Samples(self)
        self.devices = Devices(self)
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

    # ---- the config generation, across models and apps ------------------------------------------

    def config_generation(self) -> int:
        """A number that grows on every change to models or apps: poll it to know when to reload."""
        rows = self._read(lambda db: select(db, "SELECT value FROM meta WHERE key = 'config_generation'"))
        return int(rows[0]["value"]) if rows else 0
