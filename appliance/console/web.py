"""What every console page shares: templates, the user and language of the request, and error pages.

Pages are server-rendered Jinja2 templates (``templates/``) with a little plain JavaScript
(``static/console.js``); every asset is served by the appliance itself, so the console works with no
internet. Every user-visible string goes through ``_()`` (see :mod:`appliance.console.i18n`).

A page needs a login: without one the browser is sent to ``/login?next=<page>``. Roles are enforced
here, on the server, for every page and form (:func:`page_user`); the templates only hide buttons a
role cannot use, for clarity.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from appliance import __version__
from appliance.auth import Principal
from appliance.console.i18n import LANGUAGES, Language, Localizer, local_timezone, pick_language
from appliance.console.labels import LABELS
from appliance.http.security import SESSION_COOKIE, csrf_token, optional_user
from appliance.store import Role

HERE = Path(__file__).parent
LANGUAGE_COOKIE = "appliance_lang"  # the language of the login page, before anyone is logged in
LANGUAGE_COOKIE_S = 365 * 86400
NAV: tuple[tuple[str, str, Role], ...] = (
    ("/", "Overview", "viewer"),
    ("/alerts", "Alerts", "viewer"),
    ("/sources", "Sources", "viewer"),
    ("/apps", "Apps and models", "viewer"),
    ("/store", "Store", "viewer"),
    ("/samples", "Samples", "viewer"),
    ("/system", "System", "viewer"),
    ("/users", "Users", "admin"),
)

_env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                   trim_blocks=True, lstrip_blocks=True)
_TZ = local_timezone()


class LoginRequired(Exception):
    """A page was asked for without a (valid) session: the browser goes to the login page."""

    def __init__(self, next_url: str, ended: bool) -> None:
        super().__init__(next_url)
        self.next_url = next_url
        self.ended = ended  # a cookie was sent, but its session is over


class PageRefused(Exception):
    """The user's role does not allow this page or action: an error page that says whom to ask."""

    def __init__(self, needed: Role, principal: Principal) -> None:
        super().__init__(f"needs {needed}")
        self.needed = needed
        self.principal = principal


def localizer(request: Request, principal: Principal | None) -> Localizer:
    wanted: str | None = principal.user.language if principal is not None else request.cookies.get(LANGUAGE_COOKIE)
    return Localizer(pick_language(wanted, request.headers.get("accept-language", "")), _TZ)


def _next_url(request: Request) -> str:
    path = request.url.path
    return path + (f"?{request.url.query}" if request.url.query else "")


def page_user(role: Role = "viewer") -> Callable[..., Awaitable[Principal]]:
    """A page dependency: the logged-in user if their role includes ``role``; else the login or a refusal."""

    async def dependency(request: Request,
                         principal: Annotated[Principal | None, Depends(optional_user)]) -> Principal:
        if principal is None or principal.via != "session":
            raise LoginRequired(_next_url(request) if request.method == "GET" else "/",
                                ended=bool(request.cookies.get(SESSION_COOKIE)))
        if not principal.allows(role):
            raise PageRefused(role, principal)
        return principal

    dependency.__name__ = f"page_{role}"
    return dependency


PageViewer = Annotated[Principal, Depends(page_user("viewer"))]
PageOperator = Annotated[Principal, Depends(page_user("operator"))]
PageAdmin = Annotated[Principal, Depends(page_user("admin"))]


def render(request: Request, template: str, principal: Principal | None, status_code: int = 200,
           **context: Any) -> HTMLResponse:
    """A page in the user's language; ``context`` goes to the template as is."""
    loc = localizer(request, principal)
    nav = [(href, label) for href, label, role in NAV if principal is not None and principal.allows(role)]
    html = _env.get_template(template).render(
        request=request, user=principal, csrf=csrf_token(principal), languages=LANGUAGES, nav=nav,
        path=request.url.path, version=__version__, flash=request.query_params.get("done"),
        **_words(loc), **context)
    return HTMLResponse(html, status_code=status_code, headers={"cache-control": "no-store"})


def render_fragment(template: str, loc: Localizer, **context: Any) -> str:
    """A piece of a page (for server-sent events), in the given language."""
    return _env.get_template(template).render(**_words(loc), **context)


def _words(loc: Localizer) -> dict[str, Any]:
    def label(key: object) -> str:
        text = str(key)
        return loc.gettext(LABELS[text]) if text in LABELS else text

    return {"loc": loc, "_": loc.gettext, "ngettext": loc.ngettext, "label": label}


def back(to: str, done: str | None = None) -> RedirectResponse:
    """After a form: back to the page (303, so a reload does not post again), with a note of what was done."""
    if done:
        to += ("&" if "?" in to else "?") + f"done={quote(done)}"
    return RedirectResponse(to, status_code=303)


def safe_next(url: str | None) -> str:
    """Only a path on this server, so the login page cannot send anyone elsewhere."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url


def error_page(request: Request, status_code: int, message: str, hint: str = "",
               principal: Principal | None = None) -> Response:
    """An error as a page: what went wrong in words, and what to do next."""
    return render(request, "error.html", principal, status_code=status_code, code=status_code, message=message,
                  hint=hint)


def language_choice(value: str) -> Language | None:
    return value if value in LANGUAGES else None


def remember_language(response: Response, language: str, secure: bool) -> None:
    """The language of the pages seen before a login (a cookie, SameSite=Strict)."""
    response.set_cookie(LANGUAGE_COOKIE, language, max_age=LANGUAGE_COOKIE_S, samesite="strict", secure=secure)
