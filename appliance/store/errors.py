"""Errors raised by the state store.

Every error the store raises on purpose is a :class:`StoreError`; its message says what happened and
what to do. ``sqlite3`` errors never leave the package: :func:`translate` maps them, once, at the
boundary, to the most specific class here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


class StoreError(Exception):
    """Base of every error the store raises; the message tells the user what to do."""


class StoreClosed(StoreError):
    """The store was used after :meth:`Store.close`."""


class StoreBusy(StoreError):
    """Another connection (the daemon or the CLI) held the write lock for longer than the busy timeout."""


class StoreCorrupt(StoreError):
    """The database file is not SQLite or is damaged; it must be restored from a backup or moved aside."""


class SchemaTooNew(StoreError):
    """The database was migrated by newer software than this one."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            f"{path}: database schema version {found} is newer than this software ({supported}); "
            "upgrade the software or restore the backup"
        )


class NotFound(StoreError):
    """The named model, app, event, user or token is not in the store."""


class Conflict(StoreError):
    """The change contradicts what is stored (a name taken, the last admin removed)."""


class UserExists(Conflict):
    """A user of that name (compared without case) already exists."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"a user named {name!r} already exists; choose another name or change that user instead")


class LastAdmin(Conflict):
    """The change would leave no enabled admin, and so nobody who can manage users."""

    def __init__(self, name: str, change: str) -> None:
        self.name = name
        super().__init__(
            f"{name} is the last enabled admin and cannot be {change}; make another user admin first "
            "(or add one on the box: appliance users add NAME --role admin)"
        )


class ModelExists(StoreError):
    """A model with the same name and version is already installed."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"model {name}@{version} is already installed; remove it first or publish it with a new version"
        )


class ModelInUse(StoreError):
    """The model cannot be removed while apps use it; ``apps`` names them."""

    def __init__(self, name: str, version: str, apps: list[str]) -> None:
        self.name = name
        self.version = version
        self.apps = apps
        users = ", ".join(apps)
        super().__init__(
            f"model {name}@{version} is used by app(s) {users}; remove those apps or upgrade them to "
            "another model version first"
        )


class ModelMissing(StoreError):
    """An app refers to a model name and version that is not installed."""

    def __init__(self, app: str, name: str, version: str) -> None:
        self.app = app
        self.name = name
        self.version = version
        super().__init__(
            f"app {app} needs model {name}@{version}, which is not installed; "
            "install it first with `appliance models add`"
        )


def translate(err: sqlite3.Error, path: Path) -> StoreError:
    """Map a ``sqlite3`` error to the most specific :class:`StoreError`, naming the database file."""
    code = getattr(err, "sqlite_errorname", None) or ""
    text = str(err)
    if isinstance(err, sqlite3.ProgrammingError) and "closed" in text:
        return StoreClosed(f"{path}: the store is closed")
    if code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) or "not a database" in text or "malformed" in text:
        return StoreCorrupt(
            f"{path}: the file is not a valid SQLite database or is damaged ({text}); restore it from a backup, "
            "or move it aside to start again with an empty state"
        )
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return StoreBusy(
            f"{path}: the database stayed locked by another connection past the busy timeout ({text}); "
            "retry, and check for a stuck process holding it"
        )
    if code.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreError(f"{path}: the disk is full ({text}); free space (old events, snapshots, samples) and retry")
    if code.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return StoreError(
            f"{path}: cannot open the database file ({text}); check that its folder exists and is writable"
        )
    if code.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreError(f"{path}: the database is read-only ({text}); check the file's and folder's permissions")
    if code.startswith("SQLITE_IOERR"):
        return StoreError(f"{path}: disk input/output error ({text}); check the storage device")
    return StoreError(f"{path}: database error: {text}")
