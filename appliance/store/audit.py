"""``store.audit_log``: who did what, from where, and when. The store writes no line by itself: the caller,
who knows the actor, adds it after the change succeeds."""

from __future__ import annotations

import json

from sqlite_utils import Database

from appliance.store._table import Table, select
from appliance.store.records import AuditRecord, audit_from_row


class AuditLog(Table):
    def add(self, actor: str, action: str, detail: dict[str, object], address: str | None = None) -> None:
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

    def recent(self, limit: int = 50) -> list[AuditRecord]:
        """The newest ``limit`` audit lines, newest first."""
        rows = self._read(lambda db: select(db, "SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (max(0, limit),)))
        return [audit_from_row(r) for r in rows]
