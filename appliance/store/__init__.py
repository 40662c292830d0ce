"""The appliance's state store: one SQLite database (WAL, one writer thread), versioned migrations.

See :mod:`appliance.store.db` for usage, durability and concurrency.
"""

from appliance.store.accounts import Sessions, Tokens, Users
from appliance.store.apps import Apps, Subscriptions
from appliance.store.audit import AuditLog
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
from appliance.store.events import Events, Handling
from appliance.store.migrations import MIGRATIONS, SCHEMA_VERSION, Migration
from appliance.store.models import Models
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
    SpooledSample,
    TokenRecord,
    UserRecord,
)
from appliance.store.samples import Samples
from appliance.store.sources import Sources

__all__ = [
    "BUSY_TIMEOUT_MS",
    "HANDLING_ACTIONS",
    "LANGUAGES",
    "MIGRATIONS",
    "ROLES",
    "SCHEMA_VERSION",
    "AppRecord",
    "Apps",
    "AuditLog",
    "AuditRecord",
    "Conflict",
    "EventRecord",
    "Events",
    "Handling",
    "HandlingAction",
    "HandlingRecord",
    "Language",
    "LastAdmin",
    "Migration",
    "ModelExists",
    "ModelInUse",
    "ModelMissing",
    "ModelRecord",
    "Models",
    "NotFound",
    "Role",
    "Samples",
    "SchemaTooNew",
    "SessionRecord",
    "Sessions",
    "SourceRecord",
    "Sources",
    "SpooledSample",
    "Store",
    "StoreBusy",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "Subscriptions",
    "TokenRecord",
    "Tokens",
    "UserExists",
    "UserRecord",
    "Users",
]
