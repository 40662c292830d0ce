"""The appliance's state store: one SQLite database (WAL, one writer thread), versioned migrations.

See :mod:`appliance.store.db` for usage, durability and concurrency.
"""

from appliance.store.db import BUSY_TIMEOUT_MS, Store
from appliance.store.errors import (
    ModelExists,
    ModelInUse,
    ModelMissing,
    NotFound,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreCorrupt,
    StoreError,
)
from appliance.store.migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from appliance.store.records import AppRecord, AuditRecord, EventRecord, ModelRecord, SourceRecord

__all__ = [
    "BUSY_TIMEOUT_MS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AppRecord",
    "AuditRecord",
    "EventRecord",
    "Migration",
    "ModelExists",
    "ModelInUse",
    "ModelMissing",
    "ModelRecord",
    "NotFound",
    "SchemaTooNew",
    "SourceRecord",
    "Store",
    "StoreBusy",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
]
