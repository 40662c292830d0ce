"""``store.samples``: the hard-sample spool's index (the frames are files beside it, see
:mod:`appliance.samples.spool`), its quota, and the drops counted by reason."""

from __future__ import annotations

import time
from typing import Any

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.records import SpooledSample, sample_from_row


class Samples(Table):
    def add(self, sample: SpooledSample, quota_bytes: int, quota_count: int) -> tuple[bool, list[str]]:
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

    def enforce_quota(self, quota_bytes: int, quota_count: int) -> list[str]:
        """Drop the least valuable queued samples until the queue fits the quota (a lowered quota, at start);
        the ids dropped, whose files are the caller's to delete. Every drop is counted by reason."""
        return self._write(lambda db: _make_room(db, quota_bytes, quota_count, 0, None)[1])

    def count_drop(self, reason: str) -> None:
        """Count a sample that was not kept at all (no room on the disk)."""
        self._write(lambda db: _count_drop(db, reason))

    def queued(self, limit: int) -> list[SpooledSample]:
        """The next samples to upload: the most valuable first, then the oldest."""
        rows = self._read(lambda db: select(db, "SELECT * FROM samples WHERE state = 'queued' "
                                                "ORDER BY priority DESC, ts LIMIT ?", (limit,)))
        return [sample_from_row(r) for r in rows]

    def mark_uploaded(self, sample_id: str) -> None:
        self._write(lambda db: db.execute("UPDATE samples SET state = 'uploaded', uploaded = ?, "
                                          "attempts = attempts + 1 WHERE id = ?", (time.time(), sample_id)))

    def mark_refused(self, sample_id: str, reason: str) -> None:
        """The AppStore refused the record as malformed: it is not sent again; the reason is kept for the page."""
        self._write(lambda db: db.execute("UPDATE samples SET state = 'refused', refused_reason = ?, "
                                          "attempts = attempts + 1 WHERE id = ?", (reason, sample_id)))

    def mark_attempted(self, sample_id: str) -> None:
        self._write(lambda db: db.execute("UPDATE samples SET attempts = attempts + 1 WHERE id = ?",
                                          (sample_id,)))

    def counts(self) -> dict[str, Any]:
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

    def recent(self, limit: int = 50) -> list[SpooledSample]:
        rows = self._read(lambda db: select(db, "SELECT * FROM samples ORDER BY ts DESC LIMIT ?", (limit,)))
        return [sample_from_row(r) for r in rows]

    def queued_ids(self) -> set[str]:
        """The samples whose frames are still on disk (uploaded and refused ones have left it)."""
        rows = self._read(lambda db: select(db, "SELECT id FROM samples WHERE state = 'queued'"))
        return {str(r["id"]) for r in rows}

    def prune_uploaded(self, older_than_ts: float) -> int:
        return self._write(lambda db: db.execute("DELETE FROM samples WHERE state IN ('uploaded', 'refused') "
                                                 "AND COALESCE(uploaded, ts) < ?",
                                                 (older_than_ts,)).rowcount)


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
