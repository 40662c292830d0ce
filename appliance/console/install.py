"""Puts the console on the daemon's FastAPI app: pages, forms, live alerts, static assets, error pages."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.auth import CsrfRefused, PermissionDenied
from appliance.console import forms, pages, stream
from appliance.console.labels import LABELS
from appliance.console.web import HERE, LoginRequired, PageRefused, error_page, localizer
from appliance.http.errors import describe_request_error, status_for
from appliance.http.security import session_of


def install_console(app: FastAPI) -> None:
    app.include_router(stream.router)  # before pages: /alerts/stream is not an alert id
    app.include_router(pages.router)
    app.include_router(forms.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.page_errors = page_error
    for kind in (LoginRequired, PageRefused):
        app.add_exception_handler(kind, page_error)


async def page_error(request: Request, exc: Exception) -> Response:
    """An error on a page: the login for a missing session, else a page that says what to do next."""
    if isinstance(exc, LoginRequired):
        query = f"?next={quote(exc.next_url, safe='/')}" + ("&ended=1" if exc.ended else "")
        return RedirectResponse(f"/login{query}", status_code=303)
    who = exc.principal if isinstance(exc, PageRefused) else await session_of(request)
    _ = localizer(request, who).gettext

    def page(code: int, message: str, hint: str) -> Response:
        return error_page(request, code, message, hint, principal=who)

    if isinstance(exc, PageRefused):
        message = _("This needs the {role} role, and {user} is {current}.").format(
            role=_(LABELS[exc.needed]), user=exc.principal.name, current=_(LABELS[exc.principal.role]))
        return page(403, message, _("Ask an admin to change your role if you need this."))
    if isinstance(exc, CsrfRefused):
        return page(403, _("The form was refused because it came without this page's security token, or from an "
                           "old page."), _("Go back, reload the page and try again."))
    if isinstance(exc, PermissionDenied):
        return page(403, str(exc), _("Ask an admin if you need this."))
    if isinstance(exc, RequestValidationError):
        message, _fields = describe_request_error(exc)
        return page(422, message, _("Go back, check the form and try again."))
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return page(404, _("There is no page at {path}.").format(path=request.url.path),
                        _("Use the menu to find what you are looking for."))
        return page(exc.status_code, str(exc.detail), _("Go back and try again."))
    code = status_for(exc)
    if code == 500:
        return page(500, _("Something went wrong inside the appliance."),
                    _("Try again. If it keeps happening, download the diagnostics on the System page and send "
                      "them to support."))
    hints = {404: _("It may have been removed. Go back to the list."),
             409: _("Reload the page to see the current state, then try again."),
             422: _("Go back, correct the form and try again."),
             429: _("Wait a few minutes before trying again."),
             503: _("The appliance is busy. Try again in a moment.")}
    return page(code, str(exc), hints.get(code, _("Go back and try again.")))
