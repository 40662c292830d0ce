"""The console's forms (POST): log in and out, language, handling alerts, reporting a missed detection,
apps, users, and the diagnostics download.

Every form carries the session's CSRF token (checked in :func:`appliance.http.security.optional_user`),
every route checks the role on the server, and every change goes through :mod:`appliance.actions` or
:class:`appliance.auth.Accounts`, which write the audit line. After a form the browser is sent back
to the page it came from (303), with a note of what was done.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from appliance import actions
from appliance.auth import LoginFailed, NoUsersYet, Principal, TooManyAttempts
from appliance.console.web import (
    PageAdmin,
    PageOperator,
    PageViewer,
    back,
    language_choice,
    localizer,
    remember_language,
    render,
    safe_next,
)
from appliance.devices.registry import Credentials, Registry
from appliance.http.security import (
    clear_session_cookie,
    client_address,
    console,
    optional_user,
    set_session_cookie,
)
from appliance.store import HANDLING_ACTIONS, ROLES, HandlingAction, NotFound, Role
from appliance.store.devices import InvalidDevice
from appliance.store.records import DeviceAuth, SourceKind
from appliance.upgrade import control

router = APIRouter(include_in_schema=False)

Short = Annotated[str, Form(max_length=200)]
Note = Annotated[str, Form(max_length=2000)]
Secret = Annotated[str, Form(max_length=1024)]


@router.post("/login")
def login(request: Request, user: Short, password: Secret, next: Short = "/") -> Response:
    ctx = console(request)
    try:
        session = ctx.accounts.login(user, password, client_address(request))
    except (LoginFailed, NoUsersYet, TooManyAttempts) as e:
        code = 429 if isinstance(e, TooManyAttempts) else 401
        kind = "limited" if isinstance(e, TooManyAttempts) else "no_users" if isinstance(e, NoUsersYet) else "wrong"
        loc = localizer(request, None)
        return render(request, "login.html", None, status_code=code, next=safe_next(next), ended=False,
                      error=kind, detail=str(e), name=user, lang=loc.language)
    response = back(safe_next(next))
    set_session_cookie(response, session, ctx.secure_cookies)
    remember_language(response, session.user.language, ctx.secure_cookies)
    return response


@router.post("/logout")
def logout(who: PageViewer, request: Request) -> Response:
    ctx = console(request)
    ctx.accounts.logout(who, client_address(request))
    response = back("/login")
    clear_session_cookie(response, ctx.secure_cookies)
    return response


@router.post("/language")
def language(request: Request, who: Annotated[Principal | None, Depends(optional_user)], lang: Short,
             next: Short = "/") -> Response:
    """Switch language: the user's own setting when logged in, and the login page's (a cookie) either way."""
    chosen = language_choice(lang)
    if chosen is None:
        raise NotFound(f"no such language {lang!r}: choose en or zh")
    ctx = console(request)
    if who is not None and who.via == "session" and who.user.language != chosen:
        ctx.accounts.update_user(who.name, who.actor(client_address(request)), language=chosen)
    response = back(safe_next(next))
    remember_language(response, chosen, ctx.secure_cookies)
    return response


@router.post("/alerts/{event_id}/handle")
def handle(event_id: str, who: PageOperator, request: Request, action: Short, note: Note = "",
           next: Short = "") -> Response:
    if action not in HANDLING_ACTIONS:
        raise NotFound(f"no such handling {action!r}: one of {', '.join(HANDLING_ACTIONS)}")
    chosen: HandlingAction = action
    if chosen == "note" and not note.strip():
        return back(safe_next(next or f"/alerts/{event_id}"), "empty_note")
    ctx = console(request)
    actions.handle_event(ctx.store, event_id[:64], chosen, note.strip(), who.actor(client_address(request)),
                         ctx.samples)
    return back(safe_next(next or f"/alerts/{event_id}"), chosen)


@router.post("/sources/{source_id}/missed")
def report_missed(source_id: str, who: PageOperator, request: Request, label: Short = "", note: Note = "") -> Response:
    """An operator saw something on a camera's latest frame that no app flagged: keep that frame as an alert."""
    ctx = console(request)
    frame = ctx.stats.last_frame(source_id[:64]) if ctx.stats else None
    if frame is None:
        raise NotFound(f"no frame from camera {source_id[:64]} to report: wait for the camera to send one")
    event = actions.report_missed(ctx.store, ctx.snapshots_dir, source_id[:64], frame[1], label.strip(),
                                  note.strip(), who.actor(client_address(request)), ctx.samples)
    ctx.live.publish(event)
    return back(f"/alerts/{event.id}", "missed_detection")


@router.post("/apps/{name}/{what}")
def app_action(name: str, what: str, who: PageAdmin, request: Request) -> Response:
    store, by = console(request).store, who.actor(client_address(request))
    if what in ("enable", "disable"):
        actions.set_app_enabled(store, name[:64], what == "enable", by)
    elif what == "rollback":
        actions.rollback_app(store, name[:64], by)
    else:
        raise NotFound(f"no such app action {what!r}: enable, disable or rollback")
    return back("/apps", f"app_{what}")


@router.post("/system/upgrade/{what}")
def upgrade_action(what: str, who: PageAdmin, request: Request) -> Response:
    """Postpone the switch to a new release by a day, apply it now, or go back to the previous release."""
    if what not in ("postpone", "apply", "rollback"):
        raise NotFound(f"no such upgrade action {what!r}: postpone, apply or rollback")
    ctx = console(request)
    control.act(ctx.upgrades, ctx.sync_now, what, who.actor(client_address(request)))  # type: ignore[arg-type]
    return back("/system", f"upgrade_{what}")


@router.post("/store/{name}/{what}")
def subscription(name: str, what: str, who: PageAdmin, request: Request) -> Response:
    """Subscribe to an AppStore app (installed at the next sync, at once) or unsubscribe (it stays installed)."""
    ctx = console(request)
    if what not in ("subscribe", "unsubscribe"):
        raise NotFound(f"no such store action {what!r}: subscribe or unsubscribe")
    actions.set_subscription(ctx.store, name[:64], what == "subscribe", who.actor(client_address(request)))
    ctx.sync_now()
    return back("/store", what)


@router.post("/users")
def add_user(who: PageAdmin, request: Request, name: Short, role: Short, password: Secret,
             lang: Short = "en") -> Response:
    if role not in ROLES:
        raise NotFound(f"no such role {role!r}: admin, operator or viewer")
    chosen: Role = role
    console(request).accounts.add_user(name.strip(), chosen, password, who.actor(client_address(request)),
                                       language=language_choice(lang) or "en")
    return back("/users", "user_added")


@router.post("/users/{name}/update")
def update_user(name: str, who: PageAdmin, request: Request, role: Short = "", disabled: Short = "",
                password: Secret = "") -> Response:
    if role and role not in ROLES:
        raise NotFound(f"no such role {role!r}: admin, operator or viewer")
    console(request).accounts.update_user(
        name[:64], who.actor(client_address(request)), role=role or None,
        disabled={"yes": True, "no": False}.get(disabled), password=password or None)
    return back("/users", "user_updated")


@router.post("/users/{name}/remove")
def remove_user(name: str, who: PageAdmin, request: Request) -> Response:
    console(request).accounts.remove_user(name[:64], who.actor(client_address(request)))
    return back("/users", "user_removed")


def _registry(request: Request) -> Registry:
    registry = console(request).devices
    if registry is None:
        raise NotFound("this server has no device registry")
    return registry


def _handover(creds: Credentials) -> Response:
    """The credentials as one zip download, never kept on the box; the change itself is audited."""
    return Response(creds.zip(), media_type="application/zip", headers={
        "content-disposition": f'attachment; filename="{creds.device.id}-credentials.zip"',
        "cache-control": "no-store"})


@router.post("/sources/devices")
def add_device(who: PageAdmin, request: Request, device: Short, kind: Short, auth: Short = "certificate") -> Response:
    if kind not in ("camera", "sensor") or auth not in ("certificate", "password"):
        raise InvalidDevice(f"kind must be camera or sensor, and the credential a certificate or a password; got "
                            f"{kind[:40]!r} and {auth[:40]!r}")
    return _handover(_registry(request).add(device.strip(), cast(SourceKind, kind), cast(DeviceAuth, auth), who.name,
                                            client_address(request)))


@router.post("/sources/devices/{device_id}/renew")
def renew_device(device_id: str, who: PageAdmin, request: Request) -> Response:
    return _handover(_registry(request).renew(device_id[:64], who.name, client_address(request)))


@router.post("/sources/devices/{device_id}/revoke")
def revoke_device(device_id: str, who: PageAdmin, request: Request) -> Response:
    _registry(request).revoke(device_id[:64], who.name, client_address(request))
    return back("/sources", "device_revoked")


@router.post("/sources/devices/{device_id}/remove")
def remove_device(device_id: str, who: PageAdmin, request: Request) -> Response:
    _registry(request).remove(device_id[:64], who.name, client_address(request))
    return back("/sources", "device_removed")


@router.get("/system/diagnostics.zip")
async def diagnostics(who: PageOperator, request: Request) -> Response:
    """The support bundle: logs, status, configuration without secrets, audit; the download is audited."""
    ctx = console(request)
    if ctx.diagnostics is None:
        raise NotFound("this server has no diagnostics bundle")
    data = await run_in_threadpool(ctx.diagnostics)
    await run_in_threadpool(ctx.store.audit_log.add, who.name, "diagnostics.download", {"bytes": len(data)},
                            client_address(request))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    device = re.sub(r"[^A-Za-z0-9._-]", "_", ctx.status().device or "appliance")[:64]
    return Response(data, media_type="application/zip", headers={
        "content-disposition": f'attachment; filename="diagnostics-{device}-{stamp}.zip"',
        "cache-control": "no-store"})
