"""The rows of the store as frozen, slotted dataclasses, and their conversion from database rows.

Times are epoch seconds (``time.time()``). JSON documents (model card, app manifest) are kept as the
text they were installed with; callers parse them with ``formats`` when they need them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal, cast

SourceKind = Literal["camera", "sensor"]
DeviceAuth = Literal["certificate", "password"]
Box = tuple[float, float, float, float]
Role = Literal["viewer", "operator", "admin"]
Language = Literal["en", "zh"]
HandlingAction = Literal["acknowledged", "false_positive", "missed_detection", "note"]

ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # in rising order of what a role may do
LANGUAGES: tuple[Language, ...] = ("en", "zh")
HANDLING_ACTIONS: tuple[HandlingAction, ...] = ("acknowledged", "false_positive", "missed_detection", "note")


@dataclass(slots=True, frozen=True)
class ModelRecord:
    """An installed model package: ``path`` is where ``model.onnx`` lies, ``card_json`` its ``model.json``."""

    name: str
    version: str
    task: str
    sha256: str
    size_bytes: int
    path: str
    card_json: str
    installed_at: float

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(slots=True, frozen=True)
class AppRecord:
    """An installed app and the model name and version it runs."""

    name: str
    version: str
    model_name: str
    model_version: str
    manifest_json: str
    enabled: bool
    installed_at: float
    previous_manifest_json: str | None = None  # the manifest before the last upgrade (for rollback)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def model_key(self) -> str:
        return f"{self.model_name}@{self.model_version}"


@dataclass(slots=True, frozen=True)
class SourceRecord:
    """A camera or sensor seen on the broker."""

    id: str
    kind: SourceKind
    first_seen: float
    last_seen: float


@dataclass(slots=True, frozen=True)
class DeviceRecord:
    """A camera or sensor allowed on the managed broker, with its credential and what the broker saw of it."""

    id: str
    kind: SourceKind
    auth: DeviceAuth
    created: float
    cert_serial: str  # hex; "" for a password device
    expires: float | None  # when its certificate expires
    password_hash: str  # Mosquitto's PBKDF2 hash; "" for a certificate device
    revoked: float | None
    last_connect: float | None
    refusals: int
    last_refusal: str
    last_refusal_ts: float | None
    last_message: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(slots=True)
class DeviceActivity:
    """What the managed broker's log said one device did since the last flush to the store."""

    last_connect: float | None = None
    last_message: float | None = None
    refusals: int = 0
    last_refusal: str = ""
    last_refusal_ts: float | None = None


@dataclass(slots=True, frozen=True)
class RefusedConnection:
    """Connections the managed broker refused before it knew which device they were (by address, listener and
    reason); ``hint`` is the device that last connected from that address, if any."""

    address: str
    listener: str
    reason: str
    count: int
    first: float
    last: float
    hint: str


@dataclass(slots=True, frozen=True)
class EventRecord:
    """An event fired by a rule.

    ``box`` is ``(x1, y1, x2, y2)`` in 0..1 of the frame, or None. ``snapshot`` is a path relative to the
    state directory (no ``..``), or None; ``snapshot_bytes`` its size, counted against the snapshot quota.
    """

    id: str
    ts: float
    app: str
    source: str
    rule: str
    label: str
    score: float
    box: Box | None = None
    snapshot: str | None = None
    snapshot_bytes: int = 0
    created: float = field(default_factory=time.time)

    def check(self) -> None:
        """Raise ValueError if the record cannot be stored as it is."""
        if not self.id:
            raise ValueError("event id must not be empty")
        if self.snapshot_bytes < 0:
            raise ValueError(f"event {self.id}: snapshot_bytes must not be negative ({self.snapshot_bytes})")
        if self.box is not None and len(self.box) != 4:
            raise ValueError(f"event {self.id}: box must have 4 numbers (x1, y1, x2, y2)")
        if self.snapshot is not None:
            p = PurePosixPath(self.snapshot)
            if not self.snapshot or p.is_absolute() or ".." in p.parts or "\\" in self.snapshot:
                raise ValueError(
                    f"event {self.id}: snapshot {self.snapshot!r} must be a path relative to the state directory"
                )


@dataclass(slots=True, frozen=True)
class AuditRecord:
    """One line of the audit log: who (``actor``) did what (``action``) from where (``address``), with JSON
    ``detail``. ``address`` is the client's IP address, ``local`` for the CLI, or None in lines written
    before it was recorded."""

    id: int
    ts: float
    actor: str
    action: str
    detail: Mapping[str, object] = field(hash=False)
    address: str | None = None


@dataclass(slots=True, frozen=True)
class UserRecord:
    """A console user. ``password_hash`` is the self-describing scrypt string from :mod:`appliance.auth`."""

    name: str
    role: Role
    password_hash: str = field(repr=False)
    language: Language
    created: float
    disabled: bool = False


@dataclass(slots=True, frozen=True)
class TokenRecord:
    """An API token: only the SHA-256 of the secret is kept; the secret itself was shown once."""

    id: str
    name: str
    user: str
    token_hash: str = field(repr=False)
    created: float
    last_used: float | None = None


@dataclass(slots=True, frozen=True)
class SessionRecord:
    """A browser session: the cookie's SHA-256, its user and CSRF token, when it ends and where it began."""

    id_hash: str = field(repr=False)
    user: str
    csrf_token: str = field(repr=False)
    created: float
    expires: float
    address: str


@dataclass(slots=True, frozen=True)
class HandlingRecord:
    """What a user did about an event, and when: acknowledged, false positive, missed detection or a note."""

    id: int
    event_id: str
    action: HandlingAction
    user: str
    ts: float
    note: str = ""


def model_from_row(row: Mapping[str, Any]) -> ModelRecord:
    return ModelRecord(
        name=str(row["name"]),
        version=str(row["version"]),
        task=str(row["task"]),
        sha256=str(row["sha256"]),
        size_bytes=int(row["size_bytes"]),
        path=str(row["path"]),
        card_json=str(row["card"]),
        installed_at=float(row["installed_at"]),
    )


def app_from_row(row: Mapping[str, Any]) -> AppRecord:
    return AppRecord(
        name=str(row["name"]),
        version=str(row["version"]),
        model_name=str(row["model_name"]),
        model_version=str(row["model_version"]),
        manifest_json=str(row["manifest"]),
        enabled=bool(row["enabled"]),
        installed_at=float(row["installed_at"]),
        previous_manifest_json=row.get("previous_manifest"),
    )


def source_from_row(row: Mapping[str, Any]) -> SourceRecord:
    return SourceRecord(
        id=str(row["id"]),
        kind=cast(SourceKind, str(row["kind"])),
        first_seen=float(row["first_seen"]),
        last_seen=float(row["last_seen"]),
    )


def device_from_row(row: Mapping[str, Any]) -> DeviceRecord:
    def when(key: str) -> float | None:
        return None if row[key] is None else float(row[key])

    return DeviceRecord(
        id=str(row["id"]), kind=cast(SourceKind, str(row["kind"])), auth=cast(DeviceAuth, str(row["auth"])),
        created=float(row["created"]), cert_serial=str(row["cert_serial"]), expires=when("expires"),
        password_hash=str(row["password_hash"]), revoked=when("revoked"), last_connect=when("last_connect"),
        refusals=int(row["refusals"]), last_refusal=str(row["last_refusal"]), last_refusal_ts=when("last_refusal_ts"),
        last_message=when("last_message"))


def event_from_row(row: Mapping[str, Any]) -> EventRecord:
    box: Box | None = None
    if row["box"] is not None:
        x1, y1, x2, y2 = (float(v) for v in json.loads(row["box"]))
        box = (x1, y1, x2, y2)
    return EventRecord(
        id=str(row["id"]),
        ts=float(row["ts"]),
        app=str(row["app"]),
        source=str(row["source"]),
        rule=str(row["rule"]),
        label=str(row["label"]),
        score=float(row["score"]),
        box=box,
        snapshot=None if row["snapshot"] is None else str(row["snapshot"]),
        snapshot_bytes=int(row["snapshot_bytes"]),
        created=float(row["created"]),
    )


def event_to_row(event: EventRecord) -> dict[str, object]:
    return {
        "id": event.id,
        "ts": float(event.ts),
        "app": event.app,
        "source": event.source,
        "rule": event.rule,
        "label": event.label,
        "score": float(event.score),
        "box": None if event.box is None else json.dumps([float(v) for v in event.box]),
        "snapshot": event.snapshot,
        "snapshot_bytes": int(event.snapshot_bytes),
        "created": float(event.created),
    }


def audit_from_row(row: Mapping[str, Any]) -> AuditRecord:
    detail = json.loads(row["detail"])
    address = row.get("address")
    return AuditRecord(
        id=int(row["id"]),
        ts=float(row["ts"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        detail=detail if isinstance(detail, dict) else {"value": detail},
        address=None if address is None else str(address),
    )


def user_from_row(row: Mapping[str, Any]) -> UserRecord:
    return UserRecord(
        name=str(row["name"]),
        role=cast(Role, str(row["role"])),
        password_hash=str(row["password_hash"]),
        language=cast(Language, str(row["language"])),
        created=float(row["created"]),
        disabled=bool(row["disabled"]),
    )


def token_from_row(row: Mapping[str, Any]) -> TokenRecord:
    return TokenRecord(
        id=str(row["id"]),
        name=str(row["name"]),
        user=str(row["user"]),
        token_hash=str(row["token_hash"]),
        created=float(row["created"]),
        last_used=None if row["last_used"] is None else float(row["last_used"]),
    )


def session_from_row(row: Mapping[str, Any]) -> SessionRecord:
    return SessionRecord(
        id_hash=str(row["id_hash"]),
        user=str(row["user"]),
        csrf_token=str(row["csrf_token"]),
        created=float(row["created"]),
        expires=float(row["expires"]),
        address=str(row["address"]),
    )


def handling_from_row(row: Mapping[str, Any]) -> HandlingRecord:
    return HandlingRecord(
        id=int(row["id"]),
        event_id=str(row["event_id"]),
        action=cast(HandlingAction, str(row["action"])),
        user=str(row["user"]),
        ts=float(row["ts"]),
        note=str(row["note"]),
    )


@dataclass(slots=True, frozen=True)
class SpooledSample:
    """A hard sample in the spool: its metadata as sent (``meta_json``), and the bytes of its frame file."""

    id: str
    ts: float
    app: str
    source: str
    reason: str
    priority: int  # what is dropped last when the spool is full: operators' flags > near threshold > random
    bytes: int
    meta_json: str
    state: str = "queued"  # queued, uploaded, refused (the AppStore said the record is malformed)
    attempts: int = 0
    uploaded: float | None = None
    refused_reason: str = ""  # the AppStore's answer, when refused


def sample_from_row(row: Mapping[str, Any]) -> SpooledSample:
    return SpooledSample(id=str(row["id"]), ts=float(row["ts"]), app=str(row["app"]), source=str(row["source"]),
                        reason=str(row["reason"]), priority=int(row["priority"]), bytes=int(row["bytes"]),
                        meta_json=str(row["meta_json"]), state=str(row["state"]), attempts=int(row["attempts"]),
                        uploaded=row["uploaded"], refused_reason=str(row["refused_reason"]))
