"""The daemon's HTTP server (FastAPI): monitoring, the status API for the CLI, and the REST API.

- ``/healthz`` and ``/metrics`` are open: they are for local monitoring (the server binds to loopback
  by default; a site that binds it elsewhere exposes them on purpose, as Prometheus needs).
- ``/api/status`` is what ``appliance status`` reads: open to loopback clients only (the CLI runs on the
  box); anyone else gets 403 and is pointed at ``/api/v1/status``.
- ``/api/upgrade/{action}`` is what ``appliance upgrade check|apply|postpone|rollback`` posts: loopback only
  too, and only with the ``X-Appliance-CLI`` header (a page in a browser on the box cannot send it without
  a CORS preflight, which this server never grants); audited as the local CLI.
- ``/api/v1/...`` needs a login or an API token, with roles (:mod:`appliance.http.api`); its reference
  is at ``/api/docs`` and ``/api/openapi.json``, for admins only.

The console pages are built on this same app, with :mod:`appliance.http.security` for users and CSRF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance import __version__
from appliance.auth import Actor, PermissionDenied
from appliance.http.api import router as api_router
from appliance.http.context import Console
from appliance.http.docs import render_docs
from appliance.http.errors import install_error_handler
from appliance.http.security import ROLE_OF, Admin, client_address, is_loopback
from appliance.metrics import Metrics
from appliance.status import DaemonStatus
from appliance.upgrade import control

CLI_HEADER = "X-Appliance-CLI"

_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin")]


class SecurityHeaders:
    """Headers every answer gets; API answers are also never cached (they may hold personal data)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = str(scope.get("path", "")).startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + _HEADERS
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(status: Callable[[], DaemonStatus], metrics: Metrics, healthy: Callable[[], tuple[bool, str]],
              console: Console | None = None, pages: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The server; without ``console`` (no store) it serves only the monitoring routes and ``/api/status``.

    ``pages`` adds the console's pages (:func:`appliance.console.install.install_console`): passed in, not
    imported, because the console is built on this package and not the other way round."""
    app = FastAPI(title="Edge appliance", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handler(app)
    app.add_middleware(SecurityHeaders)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        ok, reason = healthy()
        return JSONResponse({"status": "ok" if ok else "degraded", "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/status", include_in_schema=False)
    def api_status(request: Request) -> DaemonStatus:
        if not is_loopback(client_address(request)):
            raise PermissionDenied("/api/status answers on the appliance itself only (for `appliance status`); "
                                   "from elsewhere log in and use /api/v1/status")
        return status()

    if console is None:
        return app
    app.state.console = console
    app.include_router(api_router)

    @app.post("/api/upgrade/{action}", include_in_schema=False)
    def cli_upgrade(action: control.Action, request: Request, hours: float = 24.0) -> dict[str, str]:
        if not is_loopback(client_address(request)) or request.headers.get(CLI_HEADER) != "1":
            raise PermissionDenied("/api/upgrade answers `appliance upgrade` on the appliance itself only; from "
                                   "elsewhere log in and use /api/v1/upgrade")
        return {"done": control.act(console.upgrades, console.sync_now, action, Actor("cli", "local"), hours)}
    if pages is not None:
        pages(app)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(who: Admin) -> dict[str, Any]:
        return _schema(app)

    @app.get("/api/docs", include_in_schema=False)
    def docs(who: Admin) -> HTMLResponse:
        return HTMLResponse(render_docs(_schema(app)))

    return app


def _schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, each operation marked with the role it needs (``x-required-role``), read from the
    route's own dependencies so the documentation cannot drift from what is enforced."""
    if app.openapi_schema is None:
        schema = app.openapi()
        for route in api_router.routes:
            if isinstance(route, APIRoute):
                role = required_role(route.dependant)
                for method in route.methods or ():
                    schema["paths"][route.path][method.lower()]["x-required-role"] = role or "anyone"
    return app.openapi_schema or {}


def required_role(dependant: Dependant) -> str | None:
    """The role a route's dependencies require, or None for an open route."""
    for dep in dependant.dependencies:
        found: str | None = ROLE_OF.get(dep.call) if dep.call is not None else None
        found = found or required_role(dep)
        if found is not None:
            return found
    return None
