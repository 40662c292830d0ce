"""``store.models``: the installed model packages (their files are the caller's, under the models folder)."""

from __future__ import annotations

from sqlite_utils import Database

from appliance.store._table import Table, check_json, select
from appliance.store.errors import ModelExists, ModelInUse, NotFound
from appliance.store.records import ModelRecord, model_from_row


class Models(Table):
    def add(self, card_json: str, name: str, version: str, task: str, sha256: str, size_bytes: int, path: str) -> None:
        """Record an installed model package. Raises :class:`ModelExists` if ``name@version`` is installed."""
        check_json(card_json, f"model {name}@{version}: card")
        if size_bytes < 0:
            raise ValueError(f"model {name}@{version}: size_bytes must not be negative ({size_bytes})")
        installed_at = self._clock()

        def write(db: Database) -> None:
            if select(db, "SELECT 1 FROM models WHERE name = ? AND version = ?", (name, version)):
                raise ModelExists(name, version)
            db.execute(
                "INSERT INTO models (name, version, task, sha256, size_bytes, path, card, installed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, task, sha256, size_bytes, path, card_json, installed_at),
            )

        self._write(write)

    def get(self, name: str, version: str) -> ModelRecord | None:
        rows = self._read(lambda db: select(db, "SELECT * FROM models WHERE name = ? AND version = ?", (name, version)))
        return model_from_row(rows[0]) if rows else None

    def all(self) -> list[ModelRecord]:
        """Every installed model, by name then installation time."""
        rows = self._read(lambda db: select(db, "SELECT * FROM models ORDER BY name, installed_at, version"))
        return [model_from_row(r) for r in rows]

    def remove(self, name: str, version: str) -> ModelRecord:
        """Forget a model and return its record (the caller deletes its files).

        Raises :class:`NotFound` if it is not installed and :class:`ModelInUse` if an app uses it.
        """

        def write(db: Database) -> ModelRecord:
            rows = select(db, "SELECT * FROM models WHERE name = ? AND version = ?", (name, version))
            if not rows:
                raise NotFound(f"model {name}@{version} is not installed")
            users = select(
                db, "SELECT name FROM apps WHERE model_name = ? AND model_version = ? ORDER BY name", (name, version)
            )
            if users:
                raise ModelInUse(name, version, [str(u["name"]) for u in users])
            db.execute("DELETE FROM models WHERE name = ? AND version = ?", (name, version))
            return model_from_row(rows[0])

        return self._write(write)
