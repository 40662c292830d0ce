"""Request and response bodies of the REST API (``/api/v1``). Times are epoch seconds."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.auth import PasswordPolicy
from appliance.status import AppStatus, SyncStatus, UpgradeStatus
from appliance.store import (
    AppRecord,
    AuditRecord,
    EventRecord,
    HandlingAction,
    HandlingRecord,
    Language,
    Role,
    TokenRecord,
    UserRecord,
)

USER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
PASSWORD_MIN = PasswordPolicy().min_length  # characters, for new passwords; the policy checks the rest
PASSWORD_MAX = PasswordPolicy().max_length


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    error: str = Field(description="what was wrong and what to do")
    fields: list[str] | None = Field(default=None, description="the request fields at fault (validation errors)")


class LoginIn(_In):
    user: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=PASSWORD_MAX)


class UserOut(BaseModel):
    name: str
    role: Role
    language: Language
    created: float
    disabled: bool

    @classmethod
    def of(cls, u: UserRecord) -> UserOut:
        return cls(name=u.name, role=u.role, language=u.language, created=u.created, disabled=u.disabled)


class LoginOut(BaseModel):
    user: UserOut
    csrf_token: str = Field(description="send it as the X-CSRF-Token header on every state-changing request")
    expires: float = Field(description="when the session ends")


class MeOut(UserOut):
    via: Literal["session", "token"]
    csrf_token: str | None = Field(description="the session's CSRF token; null with an API token")


class MeUpdate(_In):
    language: Language


class PasswordChange(_In):
    current_password: str = Field(min_length=1, max_length=PASSWORD_MAX)
    new_password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX)


class UserIn(_In):
    name: str = Field(pattern=USER_NAME_PATTERN)
    role: Role
    password: str = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX,
                          description="not containing the user name")
    language: Language = "en"


class UserUpdate(_In):
    role: Role | None = None
    language: Language | None = None
    disabled: bool | None = None
    password: str | None = Field(default=None, min_length=PASSWORD_MIN, max_length=PASSWORD_MAX,
                                 description="a new password; ends the user's sessions")


class TokenIn(_In):
    name: str = Field(min_length=1, max_length=64, description="what the token is for, e.g. the integration")
    user: str | None = Field(default=None, max_length=64,
                             description="whose rights the token carries; default: the admin making it")


class TokenOut(BaseModel):
    id: str
    name: str
    user: str
    created: float
    last_used: float | None

    @classmethod
    def of(cls, t: TokenRecord) -> TokenOut:
        return cls(id=t.id, name=t.name, user=t.user, created=t.created, last_used=t.last_used)


class TokenCreated(TokenOut):
    token: str = Field(description="the secret: shown this once and stored nowhere; send it as "
                                   "Authorization: Bearer <token>")


class HandlingIn(_In):
    action: HandlingAction
    note: str = Field(default="", max_length=2000)


class HandlingOut(BaseModel):
    action: HandlingAction
    note: str
    user: str
    ts: float

    @classmethod
    def of(cls, h: HandlingRecord) -> HandlingOut:
        return cls(action=h.action, note=h.note, user=h.user, ts=h.ts)


class EventOut(BaseModel):
    id: str
    ts: float
    app: str
    source: str
    rule: str
    label: str
    score: float
    box: list[float] | None = Field(description="x1, y1, x2, y2 in 0..1 of the frame")
    snapshot_url: str | None
    handling: list[HandlingOut]

    @classmethod
    def of(cls, e: EventRecord, handling: list[HandlingRecord]) -> EventOut:
        return cls(id=e.id, ts=e.ts, app=e.app, source=e.source, rule=e.rule, label=e.label, score=e.score,
                   box=list(e.box) if e.box else None,
                   snapshot_url=f"/api/v1/events/{e.id}/snapshot" if e.snapshot else None,
                   handling=[HandlingOut.of(h) for h in handling])


class AppOut(BaseModel):
    name: str
    version: str
    model: str
    enabled: bool
    installed_at: float
    sources: list[str]
    previous_version: str | None = Field(description="what a rollback goes back to")
    state: str | None = Field(description="serving, degraded, disabled, not placed (null: daemon not told yet)")
    partition: str | None
    reason: str

    @classmethod
    def of(cls, a: AppRecord, runtime: AppStatus | None) -> AppOut:
        manifest = json.loads(a.manifest_json)
        previous = json.loads(a.previous_manifest_json)["version"] if a.previous_manifest_json else None
        return cls(name=a.name, version=a.version, model=a.model_key, enabled=a.enabled,
                   installed_at=a.installed_at, sources=list(manifest.get("sources", [])),
                   previous_version=previous, state=runtime.state if runtime else None,
                   partition=runtime.partition if runtime else None, reason=runtime.reason if runtime else "")


class AppStoreOut(SyncStatus):
    """The AppStore link as status shows it, and the apps this site subscribed to."""

    subscriptions: list[str] = Field(description="apps whose newest version is installed beside the channel's")


class AuditOut(BaseModel):
    id: int
    ts: float
    actor: str
    action: str
    address: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, a: AuditRecord) -> AuditOut:
        return cls(id=a.id, ts=a.ts, actor=a.actor, action=a.action, address=a.address, detail=dict(a.detail))


class UpgradeActionIn(_In):
    hours: float = Field(default=24.0, gt=0, le=168, description="postpone only: no switch before this many hours")


class UpgradeActionOut(BaseModel):
    done: str = Field(description="what was done, in a sentence")
    upgrade: UpgradeStatus
