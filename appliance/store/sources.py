"""``store.sources``: the cameras and sensors seen on the broker, with their first and last sighting."""

from __future__ import annotations

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.records import SourceRecord, source_from_row

SOURCE_KINDS = ("camera", "sensor")


class Sources(Table):
    def touch(self, rows: list[tuple[str, str, float]]) -> None:
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

    def all(self) -> list[SourceRecord]:
        rows = self._read(lambda db: select(db, "SELECT * FROM sources ORDER BY id"))
        return [source_from_row(r) for r in rows]
