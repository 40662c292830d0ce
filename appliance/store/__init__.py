"""The appliance's state store: one SQLite database (WAL, one writer thread), versioned migrations.

See :mod:`appliance.store.db` for usage, durability and concurrency.
"""

from appliance.store.db import BUSY_TIMEOUT_MS, Store
from appliance.store.errors import (
    Conflict,
    LastAdmin,
    ModelExists,
    ModelInUse,
    ModelMissing,
    NotFound,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    UserExists,
)
from appliance.store.migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from appliance.store.records import (
    HANDLING_ACTIONS,
    LANGUAGES,
    ROLES,
    AppRecord,
    AuditRecord,
    EventRecord,
    HandlingAction,
    HandlingRecord,
    Language,
    ModelRecord,
    Role,
    SessionRecord,
    SourceRecord,
    TokenRecord,
    UserRecord,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
    "HANDLING_ACTIONS",
    "LANGUAGES",
    "MIGRATIONS",
    "ROLES",
    "SCHEMA_VERSION",
    "AppRecord",
    "AuditRecord",
    "Conflict",
    "EventRecord",
    "HandlingAction",
    "HandlingRecord",
    "Language",
    "LastAdmin",
    "Migration",
    "ModelExists",
    "ModelInUse",
    "ModelMissing",
    "ModelRecord",
    "NotFound",
    "Role",
    "SchemaTooNew",
    "SessionRecord",
    "SourceRecord",
    "Store",
    "StoreBusy",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "TokenRecord",
    "UserExists",
    "UserRecord",
]
