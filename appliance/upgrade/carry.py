"""After a rollback: the rows the failed release wrote are carried into the restored database.

The launcher puts the snapshot taken before the switch back in place (so the database is at a schema the
old release reads) and keeps the failed release's database aside. At its next start the old release
copies from it every row written after the snapshot of the tables whose loss a site would notice: events,
their handling by operators, the audit log and the sample index. Only the columns both schemas have are
copied (the failed release may have added some); rows already present are not copied twice, so a carry
interrupted by a crash is simply done again. Everything else the failed release changed (installed apps,
users, settings made through the console) is not carried: it is what the snapshot is there to undo.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from appliance_launcher.state import Carry, Layout, StateError

log = logging.getLogger(__name__)

CARRIED = {"events": True, "event_handling": False, "audit_log": False, "samples": True}  # table -> keeps its id


def _columns(db: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [str(r[1]) for r in db.execute(f"PRAGMA {schema}.table_info({table})")]


def carry_over(db_path: Path, carry: Carry) -> dict[str, int]:
    """Copy the failed release's new rows into ``db_path``; table -> rows carried."""
    failed = Path(carry.failed_db)
    if not failed.is_file():
        return {}
    carried: dict[str, int] = {}
    db = sqlite3.connect(f"file:{db_path}", uri=True, isolation_level=None)
    try:
        # read and write: a WAL database opened read-only needs its -shm file, which may not be there
        db.execute("ATTACH DATABASE ? AS failed", (str(failed),))
        db.execute("BEGIN IMMEDIATE")
        for table, keeps_id in CARRIED.items():
            theirs = set(_columns(db, "failed", table))
            cols = [c for c in _columns(db, "main", table) if c in theirs and (keeps_id or c != "id")]
            if "ts" not in cols:
                continue
            names = ", ".join(cols)
            try:
                cur = db.execute(
                    f"INSERT OR IGNORE INTO main.{table} ({names}) SELECT {names} FROM failed.{table} WHERE ts > ? "
                    f"EXCEPT SELECT {names} FROM main.{table} WHERE ts > ?", (carry.since, carry.since))
            except sqlite3.Error as e:  # a column the old schema requires and the new one dropped
                log.error("rows of %s from the rolled-back %s cannot be carried over: %s", table, carry.version, e)
                continue
            carried[table] = cur.rowcount
        db.execute("COMMIT")
    finally:
        db.close()
    log.warning("carried over from the rolled-back release %s: %s", carry.version,
                ", ".join(f"{n} {t}" for t, n in carried.items()) or "nothing")
    return carried


def take_carry(layout: Layout, db_path: Path) -> dict[str, int]:
    """At start: carry over what the launcher left from a rollback, then forget it (and the failed database)."""
    try:
        state = layout.state()
    except StateError as e:
        log.error("%s", e)
        return {}
    carry = state.carry
    if carry is None:
        return {}
    carried = carry_over(db_path, carry)
    state.carry = None
    layout.save(state)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{carry.failed_db}{suffix}").unlink(missing_ok=True)
    return carried
