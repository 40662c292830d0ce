"""Who a request is, and what it may do: FastAPI dependencies for routes and pages.

A request proves who it is with the session cookie (set by login) or an API token
(``Authorization: Bearer apl_...``). With the cookie, every state-changing request (anything but GET,
HEAD and OPTIONS) must also carry the session's CSRF token, in the ``X-CSRF-Token`` header or, for an
HTML form, in the ``csrf_token`` field; tokens need none, since browsers never send them on their own.

Routes declare the role they need with the annotated types::

    @router.post("/events/{event_id}/handling")
    def handle(event_id: str, body: HandlingIn, who: Operator, request: Request) -> HandlingOut: ...

and a page template gets ``principal.csrf_token`` for its forms (see :func:`csrf_token`).
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from appliance.auth import (
    CsrfRefused,
    NewSession,
    NotAuthenticated,
    PermissionDenied,
    Principal,
)
from appliance.http.context import Console
from appliance.store import Role

SESSION_COOKIE = "appliance_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PRINCIPAL_SCOPE_KEY = "appliance.principal"

_bearer = HTTPBearer(auto_error=False, scheme_name="token",
                     description="An API token made by an admin with POST /api/v1/tokens. No CSRF token needed.")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, scheme_name="session",
                       description="The session cookie set by POST /api/v1/login. State-changing requests "
                                   f"also need the session's CSRF token in the {CSRF_HEADER} header.")


def console(request: Request) -> Console:
    ctx: Console = request.app.state.console
    return ctx


def client_address(request: Request) -> str:
    """The client's IP address as the socket sees it (proxy headers are not trusted)."""
    return request.client.host if request.client else "unknown"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def _check_csrf(request: Request, principal: Principal) -> None:
    if request.method in SAFE_METHODS:
        return
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not principal.csrf_token or not hmac.compare_digest(sent.encode(), principal.csrf_token.encode()):
        what = "a wrong CSRF token" if sent else "no CSRF token"
        raise CsrfRefused(f"refused: this {request.method} came with the session cookie but {what}. Send the token "
                          f"that login returned in the {CSRF_HEADER} header (or the {CSRF_FIELD} form field); "
                          "reload the page if the session was renewed")


async def optional_user(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Principal | None:
    """The principal of the request, or None when it carries no credential (or an ended session).

    An unknown API token is refused at once (401); a session's state-changing request without its CSRF
    token is refused (403)."""
    accounts = console(request).accounts
    if bearer is not None:
        principal = await run_in_threadpool(accounts.token, bearer.credentials)
        if principal is None:
            raise NotAuthenticated("the API token is unknown, was revoked, or its user is disabled; "
                                   "ask an admin for a new one (POST /api/v1/tokens)")
        request.scope[PRINCIPAL_SCOPE_KEY] = principal
        return principal
    if cookie:
        principal = await run_in_threadpool(accounts.session, cookie)
        if principal is not None:
            request.scope[PRINCIPAL_SCOPE_KEY] = principal  # an error page still knows who is looking
            await _check_csrf(request, principal)
        return principal
    return None


async def session_of(request: Request) -> Principal | None:
    """The request's session user, for an error page where no route (so no dependency) ran."""
    found = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if isinstance(found, Principal):
        return found
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or getattr(request.app.state, "console", None) is None:
        return None
    principal: Principal | None = await run_in_threadpool(console(request).accounts.session, cookie)
    return principal


async def current_user(
    request: Request, principal: Annotated[Principal | None, Depends(optional_user)]
) -> Principal:
    """The logged-in principal; 401 with what to do otherwise."""
    if principal is None:
        if request.cookies.get(SESSION_COOKIE):
            raise NotAuthenticated("your session has ended (it expired, you logged out, or your password or "
                                   "account changed): log in again")
        raise NotAuthenticated("not logged in: log in with POST /api/v1/login, or send an API token as "
                               "Authorization: Bearer <token>")
    return principal


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets through users whose role includes ``role`` and refuses others with 403."""

    async def dependency(principal: Annotated[Principal, Depends(current_user)]) -> Principal:
        if not principal.allows(role):
            raise PermissionDenied(f"this needs the {role} role, and {principal.name} is {principal.role}; "
                                   "ask an admin if you need it")
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


require_viewer, require_operator, require_admin = require("viewer"), require("operator"), require("admin")
ROLE_OF: dict[Callable[..., Any], Role] = {require_viewer: "viewer", require_operator: "operator", require_admin: "admin"}
Viewer = Annotated[Principal, Depends(require_viewer)]
Operator = Annotated[Principal, Depends(require_operator)]
Admin = Annotated[Principal, Depends(require_admin)]


def csrf_token(principal: Principal | None) -> str:
    """The CSRF token to put in a page's forms (``<input type=hidden name=csrf_token>``); empty without a session."""
    return principal.csrf_token or "" if principal is not None else ""


def set_session_cookie(response: Response, session: NewSession, secure: bool) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it), Secure under TLS."""
    response.set_cookie(SESSION_COOKIE, session.cookie, max_age=max(0, int(session.expires - time.time())),
                        path="/", httponly=True, samesite="strict", secure=secure)


def clear_session_cookie(response: Response, secure: bool) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=secure)
