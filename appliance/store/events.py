"""``store.events``: the alerts the rules raised; ``store.handling``: what the staff did about them."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.errors import NotFound, StoreError
from appliance.store.records import (
    HANDLING_ACTIONS,
    EventRecord,
    HandlingAction,
    HandlingRecord,
    event_from_row,
    event_to_row,
    handling_from_row,
)


class Events(Table):
    def add(self, event: EventRecord) -> None:
        """Store an event. Raises :class:`StoreError` if an event with the same id is already stored."""
        event.check()
        row = event_to_row(event)

        def write(db: Database) -> None:
            if select(db, "SELECT 1 FROM events WHERE id = ?", (event.id,)):
                raise StoreError(f"event {event.id} is already stored; event ids must be unique")
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            db.execute(f"INSERT INTO events ({columns}) VALUES ({marks})", list(row.values()))

        self._write(write)

    def recent(
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
        rows = self._read(lambda db: select(db, sql, [*params, max(0, int(limit))]))
        return [event_from_row(r) for r in rows]

    def get(self, event_id: str) -> EventRecord | None:
        rows = self._read(lambda db: select(db, "SELECT * FROM events WHERE id = ?", (event_id,)))
        return event_from_row(rows[0]) if rows else None

    def totals(self) -> tuple[int, int]:
        """``(number of events, total snapshot bytes)``."""
        rows = self._read(
            lambda db: select(db, "SELECT count(*) AS n, coalesce(sum(snapshot_bytes), 0) AS bytes FROM events")
        )
        return int(rows[0]["n"]), int(rows[0]["bytes"])

    def prune(self, older_than_ts: float, max_snapshot_bytes: int) -> list[EventRecord]:
        """Remove events with ``ts`` before ``older_than_ts``, then the oldest ones until the snapshot bytes
        total is at most ``max_snapshot_bytes``. Returns the removed events, oldest first; the caller deletes
        their snapshot files (after this returns, so a crash leaves files without rows, never the reverse).
        """
        if max_snapshot_bytes < 0:
            raise ValueError(f"max_snapshot_bytes must not be negative ({max_snapshot_bytes})")

        def write(db: Database) -> list[EventRecord]:
            removed = [
                event_from_row(r)
                for r in select(db, "SELECT * FROM events WHERE ts < ? ORDER BY ts, rowid", (older_than_ts,))
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


class Handling(Table):
    def add(self, event_id: str, action: HandlingAction, user: str, note: str = "") -> HandlingRecord:
        """Record what ``user`` did about an event, now. Raises :class:`NotFound` if the event is not stored
        (never stored, or removed by retention)."""
        if action not in HANDLING_ACTIONS:
            raise ValueError(f"handling action must be one of {', '.join(HANDLING_ACTIONS)}, not {action!r}")
        ts = self._clock()

        def write(db: Database) -> HandlingRecord:
            if not select(db, "SELECT 1 FROM events WHERE id = ?", (event_id,)):
                raise NotFound(f"event {event_id} is not stored (it may have been removed by retention)")
            cursor = db.execute(
                "INSERT INTO event_handling (event_id, action, user, ts, note) VALUES (?, ?, ?, ?, ?)",
                (event_id, action, user, ts, note),
            )
            return HandlingRecord(int(cursor.lastrowid or 0), event_id, action, user, ts, note)

        return self._write(write)

    def for_events(self, event_ids: Sequence[str]) -> dict[str, list[HandlingRecord]]:
        """The handling of each of ``event_ids``, oldest first; events with none are left out."""
        out: dict[str, list[HandlingRecord]] = {}
        ids = list(dict.fromkeys(event_ids))
        for start in range(0, len(ids), 500):  # stay well under SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            sql = f"SELECT * FROM event_handling WHERE event_id IN ({marks}) ORDER BY ts, id"
            for row in self._read(functools.partial(select, sql=sql, params=chunk)):
                record = handling_from_row(row)
                out.setdefault(record.event_id, []).append(record)
        return out
