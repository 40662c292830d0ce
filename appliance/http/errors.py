"""One exception handler for the HTTP server: the project's errors become ``{"error": "..."}`` with the
status code that fits, and the message says what was wrong and what to do. No request data is echoed
(a refused body may hold a password)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.auth import InvalidAccount, NotASession, NotAuthenticated, PermissionDenied, TooManyAttempts
from appliance.errors import ApplianceError, InstallError
from appliance.store import Conflict, ModelExists, ModelInUse, ModelMissing, NotFound, StoreBusy, StoreError
from appliance.store.devices import InvalidDevice
from appliance.upgrade.errors import UpgradeError

log = logging.getLogger(__name__)

NOT_PAGES = ("/api/", "/healthz", "/metrics", "/static/")  # errors here stay JSON, even with the console

# the most specific class first
STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    (NotAuthenticated, 401),
    (PermissionDenied, 403),
    (NotASession, 400),
    (NotFound, 404),
    ((Conflict, InstallError, ModelExists, ModelInUse, ModelMissing, UpgradeError), 409),
    ((InvalidAccount, InvalidDevice), 422),
    (TooManyAttempts, 429),
    (StoreBusy, 503),
)


def status_for(exc: Exception) -> int:
    for kinds, code in STATUS:
        if isinstance(exc, kinds):
            return code
    return 500


def describe_request_error(exc: RequestValidationError) -> tuple[str, list[str]]:
    """One clause per problem, naming the field (``body.password``, ``query.limit``); never the value."""
    problems, fields = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = ".".join(loc) or "request"
        if err.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if err.get("type") == "missing" and loc == ["body"]:
            problems.append("the body is missing: send a JSON object with Content-Type: application/json")
            continue
        if err.get("type") == "model_attributes_type" and loc == ["body"]:
            problems.append("the body must be a JSON object, sent with Content-Type: application/json")
            continue
        msg = "unknown field: check its spelling against /api/docs" if err.get("type") == "extra_forbidden" \
            else str(err.get("msg", "invalid"))
        problems.append(f"{field}: {msg}")
        fields.append(field)
    return "invalid request: " + "; ".join(problems), fields


async def error_response(request: Request, exc: Exception) -> Response:
    """The one handler, registered for every error class the server can meet; on the console's pages the
    console renders the error as a page (``app.state.page_errors``)."""
    page_errors = getattr(request.app.state, "page_errors", None)
    if page_errors is not None and not request.url.path.startswith(NOT_PAGES):
        if isinstance(exc, Exception) and status_for(exc) == 500 and not isinstance(
                exc, (ApplianceError, StoreError, RequestValidationError, StarletteHTTPException)):
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        response: Response = await page_errors(request, exc)
        return response
    headers: dict[str, str] = {}
    body: dict[str, object]
    if isinstance(exc, RequestValidationError):
        message, fields = describe_request_error(exc)
        return JSONResponse({"error": message, "fields": fields}, status_code=422)
    if isinstance(exc, StarletteHTTPException):
        code = exc.status_code
        if code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (an admin can see them all at /api/docs)"
        elif code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif code == 400:
            message = f"the request body could not be read ({exc.detail}): send JSON encoded as UTF-8 with " \
                      "Content-Type: application/json (or a form, for the pages)"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=code, headers=dict(exc.headers or {}))
    code = status_for(exc)
    if isinstance(exc, NotAuthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, TooManyAttempts):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, StoreBusy):
        headers["Retry-After"] = "1"
    if code == 500 and not isinstance(exc, (ApplianceError, StoreError)):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        body = {"error": "internal error: the daemon log has the details; send it to support"}
    else:
        body = {"error": str(exc)}
        if isinstance(exc, InvalidAccount):
            body["fields"] = [exc.field]
        if code == 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(body, status_code=code, headers=headers)


def install_error_handler(app: FastAPI) -> None:
    for kind in (RequestValidationError, StarletteHTTPException, ApplianceError, StoreError, Exception):
        app.add_exception_handler(kind, error_response)
