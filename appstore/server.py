"""``appstore serve``: the repository's static files and the fleet API over HTTP.

``/metadata/...`` and ``/targets/...`` are plain files (no listing, nothing outside the two folders, Range
requests on targets, so an appliance can resume a download). ``POST /v1/devices/{id}/status`` takes a
device's report and lets the rollout guard judge it; ``GET /v1/devices`` is the fleet view for operators.
Every error is JSON ``{"error": "..."}`` that says what to do. The server holds the online keys in
``DIR/keys`` to re-sign a channel when it halts a rollout; it never needs the root keys.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from appstore import guard
from appstore.errors import AppStoreError, BadRequest, Forbidden, RepoError, Unauthorized
from appstore.fleet import Fleet
from appstore.repository import Repository
from appstore.view import fleet_view
from formats.channel import DeviceReport
from formats.errors import describe_validation_error

log = logging.getLogger("appstore.server")

MAX_REPORT_BYTES = 64 * 1024  # a report is a few hundred bytes; anything far larger is refused

_STATUS: list[tuple[type[AppStoreError], int]] = [
    (Unauthorized, 401), (Forbidden, 403), (BadRequest, 400), (RepoError, 500), (AppStoreError, 409)]


def _bearer(request: Request, who: str) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(f"send {who} as 'Authorization: Bearer <token>'")
    return token.strip()


class FleetApi:
    """The two fleet routes' logic, kept apart from FastAPI so it reads as plain calls."""

    def __init__(self, repo: Repository, fleet: Fleet) -> None:
        self.repo = repo
        self.fleet = fleet

    def report(self, device_id: str, token: str, raw: bytes) -> dict[str, Any]:
        owner = self.fleet.device_for_token(token)
        if owner is None:
            raise Unauthorized("the token is not a device token of this AppStore; register the device with "
                               "`appstore devices add ID` and give it the printed token")
        if owner != device_id:
            raise Forbidden(f"this token belongs to another device, not {device_id}; each device reports "
                            "only its own status")
        if len(raw) > MAX_REPORT_BYTES:
            raise BadRequest(f"the report is {len(raw)} bytes; at most {MAX_REPORT_BYTES} are accepted")
        try:
            report = DeviceReport.model_validate_json(raw)
        except ValidationError as e:
            raise BadRequest(describe_validation_error(e, "report", docs="docs/appstore.md").replace("\n", "; ")) from e
        if report.device != device_id:
            raise BadRequest(f"the report says device {report.device!r} but was sent for {device_id!r}; "
                             "send it to /v1/devices/<its id>/status")
        self.fleet.save_report(report, time.time())
        channel = report.channel or next((d.channel for d in self.fleet.devices() if d.id == device_id), "")
        halted = guard.watch(self.repo, self.fleet, channel) if channel else None
        if halted is not None and halted.rollout is not None:
            log.warning("channel %s: %s", channel, halted.rollout.reason)
        return {"ok": True}

    def devices(self, token: str) -> dict[str, Any]:
        if not self.fleet.is_admin_token(token):
            if self.fleet.device_for_token(token) is not None:
                raise Forbidden("a device token cannot read the fleet; use an admin token (appstore admin-token)")
            raise Unauthorized("the token is not an admin token of this AppStore; make one with: appstore admin-token")
        return fleet_view(self.repo, self.fleet)


def build_app(folder: Path) -> FastAPI:
    repo = Repository(folder)
    api = FleetApi(repo, Fleet(repo.layout.fleet_db))
    app = FastAPI(title="AppStore", docs_url=None, redoc_url=None)

    @app.exception_handler(AppStoreError)
    async def _appstore_error(request: Request, exc: AppStoreError) -> JSONResponse:
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such file: {request.url.path} (metadata and targets are fetched by exact name)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"bad request: {exc.errors()}"}, status_code=422)

    @app.post("/v1/devices/{device_id}/status")
    async def post_status(device_id: str, request: Request) -> dict[str, Any]:
        token = _bearer(request, "this device's token")
        raw = await request.body()
        result: dict[str, Any] = await run_in_threadpool(api.report, device_id, token, raw)
        return result

    @app.get("/v1/devices")
    async def get_devices(request: Request) -> dict[str, Any]:
        token = _bearer(request, "an admin token (made by: appstore admin-token)")
        result: dict[str, Any] = await run_in_threadpool(api.devices, token)
        return result

    app.mount("/metadata", StaticFiles(directory=repo.layout.metadata), name="metadata")
    app.mount("/targets", StaticFiles(directory=repo.layout.targets), name="targets")
    return app


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8600) -> None:
    import uvicorn

    app = build_app(folder)
    print(f"serving {folder} at http://{host}:{port}/  (metadata/, targets/, /v1/devices)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
