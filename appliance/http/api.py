"""The REST API, ``/api/v1``: login, status, events and their handling, apps, users, tokens, audit.

Every route states the role it needs (:mod:`appliance.http.security`); every change goes through
:mod:`appliance.actions` or :class:`appliance.auth.Accounts`, which write the audit line. Routes are
plain functions: FastAPI runs them in its thread pool, so the blocking store and scrypt calls do not
stall the event loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from appliance import actions
from appliance.auth import NotASession, Principal
from appliance.http.models import (
    AppOut,
    AppStoreOut,
    AuditOut,
    ErrorOut,
    EventOut,
    HandlingIn,
    HandlingOut,
    LoginIn,
    LoginOut,
    MeOut,
    MeUpdate,
    PasswordChange,
    TokenCreated,
    TokenIn,
    TokenOut,
    UpgradeActionIn,
    UpgradeActionOut,
    UserIn,
    UserOut,
    UserUpdate,
)
from appliance.http.security import (
    Admin,
    Operator,
    Viewer,
    clear_session_cookie,
    client_address,
    console,
    set_session_cookie,
)
from appliance.status import AppStatus, DaemonStatus, UpgradeStatus
from appliance.store import NotFound
from appliance.upgrade import control

_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "the body could not be read"),
        (401, "not logged in, or the session or token is no longer valid"),
        (403, "the role does not allow this, or the CSRF token is missing"),
        (422, "the request is malformed; the message names the field"),
    )
}
_not_found: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "no such thing"}}
_conflict: dict[int | str, dict[str, Any]] = {409: {"model": ErrorOut, "description": "contradicts the state"}}
_limited: dict[int | str, dict[str, Any]] = {429: {"model": ErrorOut, "description": "too many failed attempts"}}

router = APIRouter(prefix="/api/v1", responses=_errors)

EventId = Annotated[str, PathParam(min_length=1, max_length=64)]
Name = Annotated[str, PathParam(min_length=1, max_length=64)]


def _runtime_apps(request: Request) -> dict[str, AppStatus]:
    return {a.name: a for a in console(request).status().apps}


def _app_out(request: Request, name: str) -> AppOut:
    record = console(request).store.apps.get(name)
    if record is None:
        raise NotFound(f"no app named {name!r} is installed (see GET /api/v1/apps)")
    return AppOut.of(record, _runtime_apps(request).get(name))


# session


@router.post("/login", responses=_limited, tags=["session"])
def login(body: LoginIn, request: Request, response: Response) -> LoginOut:
    """Log in: sets the session cookie and returns the CSRF token for state-changing requests."""
    ctx = console(request)
    session = ctx.accounts.login(body.user, body.password, client_address(request))
    set_session_cookie(response, session, ctx.secure_cookies)
    return LoginOut(user=UserOut.of(session.user), csrf_token=session.csrf_token, expires=session.expires)


@router.post("/logout", status_code=204, responses={400: {"model": ErrorOut, "description": "not a session"}},
             tags=["session"])
def logout(who: Viewer, request: Request, response: Response) -> None:
    """End this browser session."""
    if who.via != "session":
        raise NotASession("logout ends a browser session; an API token is revoked with DELETE /api/v1/tokens/{id}")
    ctx = console(request)
    ctx.accounts.logout(who, client_address(request))
    clear_session_cookie(response, ctx.secure_cookies)


@router.get("/me", tags=["session"])
def me(who: Viewer) -> MeOut:
    """Who is logged in, their role and language, and the session's CSRF token."""
    u = who.user
    return MeOut(name=u.name, role=u.role, language=u.language, created=u.created, disabled=u.disabled,
                 via=who.via, csrf_token=who.csrf_token)


@router.patch("/me", tags=["session"])
def update_me(body: MeUpdate, who: Viewer, request: Request) -> UserOut:
    """Change one's own language."""
    accounts = console(request).accounts
    return UserOut.of(accounts.update_user(who.name, who.actor(client_address(request)), language=body.language))


@router.post("/me/password", status_code=204, responses=_limited, tags=["session"])
def change_password(body: PasswordChange, who: Viewer, request: Request) -> None:
    """Change one's own password; the user's other sessions end."""
    console(request).accounts.change_own_password(who, body.current_password, body.new_password,
                                                  client_address(request))


# status and events


@router.get("/status", tags=["status"])
def status(who: Viewer, request: Request) -> DaemonStatus:
    """The daemon's state: health, broker, partitions, workers, models, apps, sources, the AppStore link and the
    samples (what `appliance status` shows)."""
    return console(request).status()


@router.get("/events", tags=["events"])
def events(
    who: Viewer,
    request: Request,
    app: Annotated[str | None, Query(max_length=200)] = None,
    source: Annotated[str | None, Query(max_length=200)] = None,
    label: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[float | None, Query(allow_inf_nan=False, description="ts >= since (epoch seconds)")] = None,
    until: Annotated[float | None, Query(allow_inf_nan=False, description="ts < until (epoch seconds)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[EventOut]:
    """Stored events, newest first, with their handling."""
    store = console(request).store
    found = store.events.recent(limit=limit, app=app, source=source, label=label, since=since, until=until)
    handling = store.handling.for_events([e.id for e in found])
    return [EventOut.of(e, handling.get(e.id, [])) for e in found]


@router.get("/events/{event_id}", responses=_not_found, tags=["events"])
def event(event_id: EventId, who: Viewer, request: Request) -> EventOut:
    store = console(request).store
    found = store.events.get(event_id)
    if found is None:
        raise NotFound(f"event {event_id} is not stored (it may have been removed by retention)")
    return EventOut.of(found, store.handling.for_events([event_id]).get(event_id, []))


@router.get("/events/{event_id}/snapshot", response_class=FileResponse, tags=["events"],
            responses={**_not_found, 200: {"content": {"image/jpeg": {}}, "description": "the JPEG"}})
def snapshot(event_id: EventId, who: Viewer, request: Request) -> FileResponse:
    """The event's snapshot (JPEG, with the detection drawn), served only from the snapshots folder."""
    ctx = console(request)
    found = ctx.store.events.get(event_id)
    if found is None:
        raise NotFound(f"event {event_id} is not stored (it may have been removed by retention)")
    if not found.snapshot:
        raise NotFound(f"event {event_id} has no snapshot")
    root = ctx.snapshots_dir.resolve()
    path = (root.parent / found.snapshot).resolve()  # stored relative to the state directory
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFound(f"the snapshot of event {event_id} is gone (retention may have removed it)")
    return FileResponse(Path(path), media_type="image/jpeg")


@router.post("/events/{event_id}/handling", status_code=201, responses=_not_found, tags=["events"])
def handle(event_id: EventId, body: HandlingIn, who: Operator, request: Request) -> HandlingOut:
    """Acknowledge, mark false positive or missed detection, or add a note; stored with who and when."""
    ctx = console(request)
    record = actions.handle_event(ctx.store, event_id, body.action, body.note, who.actor(client_address(request)),
                                  ctx.samples)
    return HandlingOut.of(record)


# apps


@router.get("/apps", tags=["apps"])
def apps(who: Viewer, request: Request) -> list[AppOut]:
    """Installed apps, their model versions, partition and state."""
    runtime = _runtime_apps(request)
    return [AppOut.of(a, runtime.get(a.name)) for a in console(request).store.apps.all()]


@router.post("/apps/{name}/enable", responses=_not_found, tags=["apps"])
def enable_app(name: Name, who: Admin, request: Request) -> AppOut:
    actions.set_app_enabled(console(request).store, name, True, who.actor(client_address(request)))
    return _app_out(request, name)


@router.post("/apps/{name}/disable", responses=_not_found, tags=["apps"])
def disable_app(name: Name, who: Admin, request: Request) -> AppOut:
    actions.set_app_enabled(console(request).store, name, False, who.actor(client_address(request)))
    return _app_out(request, name)


@router.post("/apps/{name}/rollback", responses={**_not_found, **_conflict}, tags=["apps"])
def rollback_app(name: Name, who: Admin, request: Request) -> AppOut:
    """Back to the version before the last upgrade; served with no gap."""
    actions.rollback_app(console(request).store, name, who.actor(client_address(request)))
    return _app_out(request, name)


# the appliance's own upgrades


def _upgrade_status(request: Request) -> UpgradeStatus:
    status = console(request).status()
    return status.upgrade or UpgradeStatus(running=status.version)


@router.get("/upgrade", tags=["upgrade"])
def upgrade(who: Viewer, request: Request) -> UpgradeStatus:
    """The appliance's own release: running and previous versions, what the channel asks for, an upgrade under
    way (state, bytes received of total), the maintenance window, and the history with reasons."""
    return _upgrade_status(request)


@router.post("/upgrade/{action}", responses=_conflict, tags=["upgrade"])
def upgrade_action(action: control.Action, who: Admin, request: Request,
                   body: UpgradeActionIn | None = None) -> UpgradeActionOut:
    """``check`` the AppStore now; ``apply`` an installed release now, even outside the window; ``postpone``
    the switch by ``hours``; ``rollback`` to the previous release (the appliance restarts)."""
    ctx = console(request)
    done = control.act(ctx.upgrades, ctx.sync_now, action, who.actor(client_address(request)),
                       (body or UpgradeActionIn()).hours)
    return UpgradeActionOut(done=done, upgrade=_upgrade_status(request))


# users


# the AppStore


@router.get("/appstore", tags=["appstore"])
def appstore(who: Viewer, request: Request) -> AppStoreOut:
    """The AppStore link: state, channel, rollout, last sync and error, what is desired, refused and
    downloading, the published catalog, and the site's subscriptions."""
    ctx = console(request)
    return AppStoreOut(**dict(ctx.status().appstore), subscriptions=ctx.store.subscriptions.all())


@router.put("/appstore/subscriptions/{name}", status_code=204, tags=["appstore"])
def subscribe(name: Name, who: Admin, request: Request) -> None:
    """Subscribe this site to an AppStore app: its newest version is installed at the next sync (now)."""
    _change_subscription(request, who, name, subscribe=True)


@router.delete("/appstore/subscriptions/{name}", status_code=204, tags=["appstore"])
def unsubscribe(name: Name, who: Admin, request: Request) -> None:
    """Stop following an app's updates; the installed app stays until removed."""
    _change_subscription(request, who, name, subscribe=False)


def _change_subscription(request: Request, who: Principal, name: str, subscribe: bool) -> None:
    ctx = console(request)
    actions.set_subscription(ctx.store, name, subscribe, who.actor(client_address(request)))
    ctx.sync_now()


@router.get("/users", tags=["users"])
def users(who: Admin, request: Request) -> list[UserOut]:
    return [UserOut.of(u) for u in console(request).store.users.all()]


@router.post("/users", status_code=201, responses=_conflict, tags=["users"])
def add_user(body: UserIn, who: Admin, request: Request) -> UserOut:
    accounts = console(request).accounts
    return UserOut.of(accounts.add_user(body.name, body.role, body.password, who.actor(client_address(request)),
                                        body.language))


@router.patch("/users/{name}", responses={**_not_found, **_conflict}, tags=["users"])
def update_user(name: Name, body: UserUpdate, who: Admin, request: Request) -> UserOut:
    """Change a user's role, language, password, or disable them (which ends their sessions)."""
    accounts = console(request).accounts
    return UserOut.of(accounts.update_user(name, who.actor(client_address(request)), role=body.role,
                                           language=body.language, disabled=body.disabled, password=body.password))


@router.delete("/users/{name}", status_code=204, responses={**_not_found, **_conflict}, tags=["users"])
def remove_user(name: Name, who: Admin, request: Request) -> None:
    """Remove a user with their sessions and tokens; their handling and audit lines stay."""
    console(request).accounts.remove_user(name, who.actor(client_address(request)))


# API tokens


@router.get("/tokens", tags=["tokens"])
def tokens(who: Admin, request: Request) -> list[TokenOut]:
    return [TokenOut.of(t) for t in console(request).store.tokens.all()]


@router.post("/tokens", status_code=201, responses=_not_found, tags=["tokens"])
def create_token(body: TokenIn, who: Admin, request: Request) -> TokenCreated:
    """Make an API token carrying ``user``'s role; the secret is in this answer only."""
    record, secret = console(request).accounts.create_token(body.user or who.name, body.name,
                                                            who.actor(client_address(request)))
    return TokenCreated(**TokenOut.of(record).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", status_code=204, responses=_not_found, tags=["tokens"])
def revoke_token(token_id: Name, who: Admin, request: Request) -> None:
    console(request).accounts.revoke_token(token_id, who.actor(client_address(request)))


# audit


@router.get("/audit", tags=["audit"])
def audit(who: Admin, request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditOut]:
    """The newest audit lines: who did what, when, from where."""
    return [AuditOut.of(a) for a in console(request).store.audit_log.recent(limit)]
