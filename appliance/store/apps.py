"""``store.apps``: the installed apps, each on an installed model; ``store.subscriptions``: the AppStore apps
the site asked for, beside its channel's."""

from __future__ import annotations

import time

from sqlite_utils import Database

from appliance.store._table import Table, check_json, select
from appliance.store.errors import ModelMissing, NotFound
from appliance.store.records import AppRecord, app_from_row


class Apps(Table):
    def add(self, manifest_json: str, name: str, version: str, model_name: str, model_version: str) -> None:
        """Install an app, or upgrade the installed app of that name (keeping its enabled flag).

        A new app starts enabled. Raises :class:`ModelMissing` if ``model_name@model_version`` is not installed.
        """
        check_json(manifest_json, f"app {name}@{version}: manifest")
        installed_at = self._clock()

        def write(db: Database) -> None:
            if not select(db, "SELECT 1 FROM models WHERE name = ? AND version = ?", (model_name, model_version)):
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

    def get(self, name: str) -> AppRecord | None:
        rows = self._read(lambda db: select(db, "SELECT * FROM apps WHERE name = ?", (name,)))
        return app_from_row(rows[0]) if rows else None

    def all(self) -> list[AppRecord]:
        rows = self._read(lambda db: select(db, "SELECT * FROM apps ORDER BY name"))
        return [app_from_row(r) for r in rows]

    def remove(self, name: str) -> AppRecord:
        """Uninstall an app and return its record. Raises :class:`NotFound` if it is not installed."""

        def write(db: Database) -> AppRecord:
            rows = select(db, "SELECT * FROM apps WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"app {name} is not installed")
            db.execute("DELETE FROM apps WHERE name = ?", (name,))
            return app_from_row(rows[0])

        return self._write(write)

    def set_enabled(self, name: str, enabled: bool) -> AppRecord:
        """Enable or disable an app and return its new record; no change (and no reload) if already so.

        Raises :class:`NotFound` if the app is not installed.
        """

        def write(db: Database) -> AppRecord:
            rows = select(db, "SELECT * FROM apps WHERE name = ?", (name,))
            if not rows:
                raise NotFound(f"app {name} is not installed")
            if bool(rows[0]["enabled"]) != enabled:
                db.execute("UPDATE apps SET enabled = ? WHERE name = ?", (int(enabled), name))
                rows = select(db, "SELECT * FROM apps WHERE name = ?", (name,))
            return app_from_row(rows[0])

        return self._write(write)


class Subscriptions(Table):
    def add(self, app: str, user: str) -> bool:
        """Subscribe to an AppStore app; False if it was already subscribed."""

        def write(db: Database) -> bool:
            cur = db.execute("INSERT OR IGNORE INTO subscriptions (app, user, created) VALUES (?, ?, ?)",
                             (app, user, time.time()))
            return bool(cur.rowcount)

        return self._write(write)

    def remove(self, app: str) -> bool:
        """False if it was not subscribed. The installed app stays until removed."""
        return self._write(lambda db: bool(db.execute("DELETE FROM subscriptions WHERE app = ?", (app,)).rowcount))

    def all(self) -> list[str]:
        rows = self._read(lambda db: select(db, "SELECT app FROM subscriptions ORDER BY app", ()))
        return [str(r["app"]) for r in rows]
