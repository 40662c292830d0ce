"""The state store against real SQLite files: schema, refusals, pruning, threads, a killed process."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlite_utils import Database

from appliance.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    EventRecord,
    Migration,
    ModelExists,
    ModelInUse,
    ModelMissing,
    NotFound,
    SchemaTooNew,
    Store,
    StoreClosed,
    StoreCorrupt,
    StoreError,
)

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 60.0  # generous upper bound for a subprocess to start and write; never waited on in a pass


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as s:
        yield s


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def _add_model(store: Store, name: str = "ppe-detector", version: str = "1.0.0") -> None:
    card = json.dumps({"name": name, "version": version, "task": "detection"})
    store.models.add(card, name, version, "detection", "ab" * 32, 1234, f"models/{name}/{version}/model.onnx")


def _add_app(store: Store, name: str = "ppe-watch", version: str = "1.0.0", model: str = "ppe-detector",
             model_version: str = "1.0.0") -> None:
    manifest = json.dumps({"name": name, "version": version, "model": {"name": model, "version": model_version}})
    store.apps.add(manifest, name, version, model, model_version)


def _event(i: int, *, ts: float | None = None, app: str = "ppe-watch", source: str = "cam1",
           snapshot_bytes: int = 0) -> EventRecord:
    return EventRecord(
        id=f"ev-{i}",
        ts=float(i) if ts is None else ts,
        app=app,
        source=source,
        rule="no-helmet",
        label="person",
        score=0.9,
        box=(0.1, 0.2, 0.3, 0.4),
        snapshot=f"snapshots/ev-{i}.jpg" if snapshot_bytes else None,
        snapshot_bytes=snapshot_bytes,
    )


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("store-writer:")]


# ---- schema and migrations ----------------------------------------------------------------------


def test_fresh_file_is_migrated_to_the_latest_schema(db_path: Path) -> None:
    with Store(db_path) as store:
        assert store.config_generation() == 0
    conn = _raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == MIGRATIONS[-1].version
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = set(Database(conn).table_names())
    assert {"models", "apps", "sources", "events", "audit_log", "meta"} <= tables
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"events_ts", "events_app_ts"} <= indexes
    conn.close()


def test_reopening_applies_nothing_twice_and_keeps_data(db_path: Path) -> None:
    with Store(db_path) as store:
        _add_model(store)
        generation = store.config_generation()
    with Store(db_path) as store:
        assert [m.key for m in store.models.all()] == ["ppe-detector@1.0.0"]
        assert store.config_generation() == generation
    conn = _raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_migrations_run_in_order_and_a_failing_one_is_rolled_back(db_path: Path) -> None:
    calls: list[int] = []

    def add_column(db: Database) -> None:
        calls.append(2)
        db.execute("ALTER TABLE meta ADD COLUMN note TEXT")

    def broken(db: Database) -> None:
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    base = (MIGRATIONS[0], Migration(2, add_column))
    with pytest.raises(StoreError, match=r"migration 3 failed .*version 2.*boom"):
        Store(db_path, migrations=(*base, Migration(3, broken)))
    assert not _writer_threads()
    conn = _raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "half_done" not in Database(conn).table_names()
    conn.close()

    with Store(db_path, migrations=(*base, Migration(3, "CREATE TABLE done (x INTEGER);"))) as store:
        assert store.config_generation() == 0
    assert calls == [2]  # migration 2 was not repeated
    conn = _raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert "done" in Database(conn).table_names()
    conn.close()


def test_a_database_newer_than_the_software_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    conn = _raw(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaTooNew) as info:
        Store(db_path)
    message = str(info.value)
    assert f"database schema version {SCHEMA_VERSION + 1} is newer than this software ({SCHEMA_VERSION})" in message
    assert "upgrade the software or restore the backup" in message
    assert str(db_path) in message
    assert not _writer_threads()


def test_a_corrupt_file_is_named_with_what_to_do(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an SQLite database, just text " * 100)
    with pytest.raises(StoreCorrupt) as info:
        Store(db_path)
    assert str(db_path) in str(info.value)
    assert "restore it from a backup" in str(info.value)
    assert not _writer_threads()


# ---- models and apps ----------------------------------------------------------------------------


def test_models_add_get_list_remove(store: Store) -> None:
    _add_model(store, version="1.0.0")
    _add_model(store, version="1.1.0")
    _add_model(store, name="gas-anomaly", version="2.0.0")
    assert [m.key for m in store.models.all()] == ["gas-anomaly@2.0.0", "ppe-detector@1.0.0", "ppe-detector@1.1.0"]
    model = store.models.get("ppe-detector", "1.1.0")
    assert model is not None
    assert (model.task, model.size_bytes, model.path) == ("detection", 1234, "models/ppe-detector/1.1.0/model.onnx")
    assert json.loads(model.card_json)["version"] == "1.1.0"
    assert store.models.get("ppe-detector", "9.9.9") is None

    removed = store.models.remove("ppe-detector", "1.0.0")
    assert removed.key == "ppe-detector@1.0.0"
    assert store.models.get("ppe-detector", "1.0.0") is None


def test_a_duplicate_model_is_refused(store: Store) -> None:
    _add_model(store)
    with pytest.raises(ModelExists, match=r"ppe-detector@1\.0\.0 is already installed; remove it first"):
        _add_model(store)
    assert len(store.models.all()) == 1


def test_removing_a_missing_model_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match=r"model ghost@1 is not installed"):
        store.models.remove("ghost", "1")


def test_a_model_in_use_cannot_be_removed(store: Store) -> None:
    _add_model(store)
    _add_app(store, name="ppe-watch")
    _add_app(store, name="gate-watch")
    with pytest.raises(ModelInUse) as info:
        store.models.remove("ppe-detector", "1.0.0")
    assert info.value.apps == ["gate-watch", "ppe-watch"]
    assert "used by app(s) gate-watch, ppe-watch" in str(info.value)
    store.apps.remove("ppe-watch")
    store.apps.remove("gate-watch")
    store.models.remove("ppe-detector", "1.0.0")
    assert store.models.all() == []


def test_an_app_needs_its_model_installed(store: Store) -> None:
    with pytest.raises(ModelMissing) as info:
        _add_app(store)
    assert "ppe-detector@1.0.0" in str(info.value)
    assert "appliance models add" in str(info.value)
    assert store.apps.all() == []


def test_apps_add_upgrade_enable_remove(store: Store) -> None:
    _add_model(store, version="1.0.0")
    _add_model(store, version="2.0.0")
    _add_app(store)
    app = store.apps.get("ppe-watch")
    assert app is not None and app.enabled and app.model_key == "ppe-detector@1.0.0"

    disabled = store.apps.set_enabled("ppe-watch", False)
    assert not disabled.enabled

    _add_app(store, version="1.1.0", model_version="2.0.0")  # upgrade keeps the enabled flag
    upgraded = store.apps.get("ppe-watch")
    assert upgraded is not None
    assert (upgraded.key, upgraded.model_key, upgraded.enabled) == ("ppe-watch@1.1.0", "ppe-detector@2.0.0", False)
    assert json.loads(upgraded.manifest_json)["version"] == "1.1.0"
    assert [a.name for a in store.apps.all()] == ["ppe-watch"]
    store.models.remove("ppe-detector", "1.0.0")  # no longer in use after the upgrade

    assert store.apps.remove("ppe-watch").key == "ppe-watch@1.1.0"
    assert store.apps.get("ppe-watch") is None
    with pytest.raises(NotFound, match="app ppe-watch is not installed"):
        store.apps.remove("ppe-watch")
    with pytest.raises(NotFound, match="app ppe-watch is not installed"):
        store.apps.set_enabled("ppe-watch", True)


def test_config_generation_counts_changes_to_models_and_apps(store: Store) -> None:
    seen = [store.config_generation()]

    def changed() -> bool:
        now = store.config_generation()
        grew = now > seen[-1]
        seen.append(now)
        return grew

    _add_model(store)
    assert changed()
    _add_app(store)
    assert changed()
    _add_app(store, version="1.0.1")
    assert changed()
    store.apps.set_enabled("ppe-watch", False)
    assert changed()
    store.apps.set_enabled("ppe-watch", False)  # already disabled: nothing to reload
    assert not changed()
    with pytest.raises(ModelExists):
        _add_model(store)
    with pytest.raises(ModelInUse):
        store.models.remove("ppe-detector", "1.0.0")
    assert not changed()  # refused changes do not bump it
    store.events.add(_event(1))
    store.sources.touch([("cam1", "camera", 1.0)])
    store.audit_log.add("admin", "test", {})
    assert not changed()  # only models and apps count
    store.apps.remove("ppe-watch")
    assert changed()
    store.models.remove("ppe-detector", "1.0.0")
    assert changed()


# ---- sources, events, audit ---------------------------------------------------------------------


def test_sources_keep_their_first_sighting(store: Store) -> None:
    store.sources.touch([("cam1", "camera", 10.0), ("gas1", "sensor", 11.0)])
    store.sources.touch([("cam1", "camera", 20.0)])
    store.sources.touch([("cam1", "camera", 15.0)])  # late, out-of-order batch does not move last_seen back
    by_id = {s.id: s for s in store.sources.all()}
    assert (by_id["cam1"].first_seen, by_id["cam1"].last_seen, by_id["cam1"].kind) == (10.0, 20.0, "camera")
    assert (by_id["gas1"].first_seen, by_id["gas1"].last_seen, by_id["gas1"].kind) == (11.0, 11.0, "sensor")
    with pytest.raises(ValueError, match="kind must be 'camera' or 'sensor'"):
        store.sources.touch([("x", "microphone", 1.0)])


def test_events_newest_first_with_filters(store: Store) -> None:
    first = _event(1, app="ppe-watch", source="cam1", snapshot_bytes=100)
    store.events.add(first)
    store.events.add(_event(2, app="gas-watch", source="gas1"))
    store.events.add(_event(3, app="ppe-watch", source="cam2", snapshot_bytes=50))
    store.events.add(_event(4, app="ppe-watch", source="cam1"))
    assert [e.id for e in store.events.recent()] == ["ev-4", "ev-3", "ev-2", "ev-1"]
    assert [e.id for e in store.events.recent(limit=2)] == ["ev-4", "ev-3"]
    assert [e.id for e in store.events.recent(app="ppe-watch")] == ["ev-4", "ev-3", "ev-1"]
    assert [e.id for e in store.events.recent(app="ppe-watch", source="cam1")] == ["ev-4", "ev-1"]
    assert store.events.totals() == (4, 150)

    stored = store.events.get("ev-1")
    assert stored == first
    assert stored is not None
    assert (stored.box, stored.snapshot, stored.snapshot_bytes) == ((0.1, 0.2, 0.3, 0.4), "snapshots/ev-1.jpg", 100)
    assert store.events.get("nope") is None

    with pytest.raises(StoreError, match="event ev-1 is already stored"):
        store.events.add(_event(1))
    with pytest.raises(ValueError, match="relative to the state directory"):
        store.events.add(EventRecord("bad", 1.0, "a", "s", "r", "l", 0.5, snapshot="../../etc/passwd"))
    assert store.events.totals() == (4, 150)


def test_prune_by_age(store: Store) -> None:
    for i in range(1, 6):
        store.events.add(_event(i, snapshot_bytes=10))
    removed = store.events.prune(older_than_ts=3.0, max_snapshot_bytes=10_000)
    assert [e.id for e in removed] == ["ev-1", "ev-2"]
    assert [e.id for e in store.events.recent()] == ["ev-5", "ev-4", "ev-3"]
    assert store.events.totals() == (3, 30)


def test_prune_by_snapshot_bytes_removes_the_oldest_first(store: Store) -> None:
    # inserted out of time order: age is the event's ts, not the insertion order
    for i, size in [(3, 300), (1, 100), (5, 0), (2, 200), (4, 400)]:
        store.events.add(_event(i, snapshot_bytes=size))
    assert store.events.totals() == (5, 1000)
    removed = store.events.prune(older_than_ts=0.0, max_snapshot_bytes=450)
    assert [e.id for e in removed] == ["ev-1", "ev-2", "ev-3"]
    assert [(e.snapshot, e.snapshot_bytes) for e in removed] == [
        ("snapshots/ev-1.jpg", 100),
        ("snapshots/ev-2.jpg", 200),
        ("snapshots/ev-3.jpg", 300),
    ]
    assert store.events.totals() == (2, 400)
    assert store.events.prune(older_than_ts=0.0, max_snapshot_bytes=450) == []


def test_prune_by_age_then_bytes(store: Store) -> None:
    for i in range(1, 7):
        store.events.add(_event(i, snapshot_bytes=100))
    removed = store.events.prune(older_than_ts=3.0, max_snapshot_bytes=250)
    assert [e.id for e in removed] == ["ev-1", "ev-2", "ev-3", "ev-4"]
    assert store.events.totals() == (2, 200)
    with pytest.raises(ValueError):
        store.events.prune(older_than_ts=0.0, max_snapshot_bytes=-1)


def test_audit_log_newest_first(db_path: Path) -> None:
    ticks = iter(range(100, 200))
    with Store(db_path, clock=lambda: float(next(ticks))) as store:
        store.audit_log.add("admin", "models.add", {"model": "ppe-detector@1.0.0"})
        store.audit_log.add("operator", "apps.disable", {"app": "ppe-watch", "path": Path("/x")})
        lines = store.audit_log.recent(10)
    assert [(a.actor, a.action) for a in lines] == [("operator", "apps.disable"), ("admin", "models.add")]
    assert lines[0].detail == {"app": "ppe-watch", "path": "/x"}
    assert lines[0].ts > lines[1].ts
    assert lines[1].id < lines[0].id


# ---- threads, processes, close ------------------------------------------------------------------


def test_concurrent_writes_from_many_threads_all_land(store: Store) -> None:
    threads, per_thread = 8, 40

    def work(t: int) -> None:
        for i in range(per_thread):
            store.events.add(_event(t * 1000 + i, snapshot_bytes=1))
            store.sources.touch([(f"cam{t}", "camera", float(i))])

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, t) for t in range(threads)]:
            f.result()
    assert store.events.totals() == (threads * per_thread, threads * per_thread)
    assert len(store.sources.all()) == threads


def test_two_stores_on_one_file_write_at_once(db_path: Path) -> None:
    """The daemon and the CLI: two connections' writers contend for SQLite's lock and both succeed."""
    with Store(db_path) as daemon, Store(db_path) as cli:
        def work(s: Store, base: int) -> None:
            for i in range(50):
                s.events.add(_event(base + i))

        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(work, daemon, 0), pool.submit(work, cli, 1000)]:
                f.result()
        assert daemon.events.totals()[0] == cli.events.totals()[0] == 100


def test_reads_from_other_threads_see_committed_writes(store: Store) -> None:
    _add_model(store)
    with ThreadPoolExecutor(4) as pool:
        keys = list(pool.map(lambda _: [m.key for m in store.models.all()], range(8)))
        assert keys == [["ppe-detector@1.0.0"]] * 8
        _add_app(store)
        generations = set(pool.map(lambda _: store.config_generation(), range(8)))
    assert generations == {2}


def test_close_is_idempotent_and_later_use_raises(db_path: Path) -> None:
    store = Store(db_path)
    store.models.all()  # opens this thread's read connection
    store.close()
    store.close()
    assert store.closed
    assert not _writer_threads()
    with pytest.raises(StoreClosed, match="is closed"):
        store.models.all()
    with pytest.raises(StoreClosed, match="is closed"):
        _add_model(store)
    with ThreadPoolExecutor(1) as pool:  # a thread that never read before
        assert isinstance(pool.submit(store.config_generation).exception(), StoreClosed)


def test_close_drains_writes_already_queued(db_path: Path) -> None:
    """Writers racing close(): each call either commits (and is on disk) or raises StoreClosed; none hangs."""
    store = Store(db_path)
    committed: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    busy = threading.Event()  # set once writes are flowing, so close() lands among queued writes

    def work(t: int) -> None:
        for i in range(10_000):
            event = _event(t * 100_000 + i)
            try:
                store.events.add(event)
            except StoreClosed:
                with lock:
                    refused.append(event.id)
                return
            with lock:
                committed.append(event.id)
                if len(committed) >= 40:
                    busy.set()

    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    assert busy.wait(DEADLINE_S)
    store.close()
    for w in workers:
        w.join(DEADLINE_S)
        assert not w.is_alive()
    assert len(refused) == 4  # every worker was stopped by the close, not by running out of work
    with Store(db_path) as reopened:
        stored = {e.id for e in reopened.events.recent(limit=100_000)}
    assert stored == set(committed)  # every write that returned is there, nothing else
    assert not stored & set(refused)


_CHILD = """
import sys
from pathlib import Path
from appliance.store import EventRecord, Store

store = Store(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    store.events.add(EventRecord(id=f"crash-{i}", ts=float(i), app="a", source="cam1", rule="r", label="l",
                                 score=0.5, snapshot=f"snapshots/{i}.jpg", snapshot_bytes=10))
print("ready", flush=True)
sys.stdin.read()  # wait to be killed
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_committed_writes_survive_sigkill(db_path: Path) -> None:
    n = 200
    with Store(db_path) as daemon:  # another process writes while this one holds the file open
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(db_path), str(n)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            lines: queue.Queue[str] = queue.Queue()
            out = child.stdout
            assert out is not None
            threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
            try:
                line = lines.get(timeout=DEADLINE_S)
            except queue.Empty:
                pytest.fail("the child did not print 'ready' in time")
            assert line.strip() == "ready", child.stderr.read() if child.stderr else line
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=DEADLINE_S) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
        assert daemon.events.totals() == (n, 10 * n)
    with Store(db_path) as reopened:
        assert reopened.events.totals() == (n, 10 * n)
        assert {e.id for e in reopened.events.recent(limit=n)} == {f"crash-{i}" for i in range(n)}
