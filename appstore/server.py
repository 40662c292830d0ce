"""``appstore serve``: the repository's static files and the fleet API over HTTP.

``/metadata/...`` and ``/targets/...`` are plain files (no listing, nothing outside the two folders, Range
requests on targets, so an appliance can resume a download). ``POST /v1/devices/{id}/status`` takes a
device's report and lets the rollout guard judge it; ``GET /v1/devices`` is the fleet view for operators.
``PUT /v1/devices/{id}/samples/{sample_id}`` is the sample inbox (docs/samples.md), ``GET /v1/samples`` its
listing for operators. ``PUT /v1/bootstrap/{serial}`` registers a box's provisioning bundle (admins);
``POST /v1/bootstrap/{serial}`` hands it to the box and ``POST /v1/enrol`` enrols it, each for a proof of
the box's factory identity (docs/provisioning.md).
Every error is JSON ``{"error": "..."}`` that says what to do. The server holds the online keys in
``DIR/keys`` to re-sign a channel when it halts a rollout; it never needs the root keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from appstore import guard
from appstore.bootstrap import Bootstrap, NotRegistered
from appstore.errors import AppStoreError, BadRequest, Forbidden, RepoError, TooLarge, Unauthorized
from appstore.fleet import Fleet
from appstore.fleet_ca import FleetCA
from appstore.repository import Repository
from appstore.samples import Inbox, InboxLimits, check_sample_id
from appstore.view import fleet_view
from formats.channel import DeviceReport
from formats.errors import describe_validation_error
from formats.provisioning import MAX_BUNDLE_BYTES, DeviceProof, Enrolment

log = logging.getLogger("appstore.server")

MAX_REPORT_BYTES = 64 * 1024  # a report is a few hundred bytes; anything far larger is refused
MAX_PROOF_BYTES = 16 * 1024  # a device proof: a certificate and a signature

_STATUS: list[tuple[type[AppStoreError], int]] = [
    (NotRegistered, 404), (Unauthorized, 401), (Forbidden, 403), (BadRequest, 400), (TooLarge, 413), (RepoError, 500), (AppStoreError, 409)]


def _bearer(request: Request, who: str) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(f"send {who} as 'Authorization: Bearer <token>'")
    return token.strip()


class FleetApi:
    """The fleet routes' logic, kept apart from FastAPI so it reads as plain calls."""

    def __init__(self, repo: Repository, fleet: Fleet, inbox: Inbox, bootstrap: Bootstrap) -> None:
        self.repo = repo
        self.fleet = fleet
        self.inbox = inbox
        self.bootstrap = bootstrap

    def register(self, token: str, serial: str, raw: bytes) -> dict[str, Any]:
        self.authenticate_admin(token)
        verified = self.bootstrap.register(raw, f"the bundle for {serial}", serial)
        c = verified.conveyed
        log.info("provisioning bundle registered for box %s (%s, version %d)", serial, c.device_id, c.version)
        return {"serial": serial, "device_id": c.device_id, "version": c.version, "channel": c.appstore.channel}

    def authenticate_device(self, device_id: str, token: str) -> None:
        """Let through only ``device_id``'s own token: 401 when it is no device's, 403 when another's."""
        owner = self.fleet.device_for_token(token)
        if owner is None:
            raise Unauthorized("the token is not a device token of this AppStore; register the device with "
                               "`appstore devices add ID` and give it the printed token")
        if owner != device_id:
            raise Forbidden(f"this token belongs to another device, not {device_id}; each device sends "
                            "only its own status and samples")

    def authenticate_admin(self, token: str) -> None:
        if not self.fleet.is_admin_token(token):
            if self.fleet.device_for_token(token) is not None:
                raise Forbidden("a device token cannot read the fleet or its samples; use an admin token "
                                "(appstore admin-token)")
            raise Unauthorized("the token is not an admin token of this AppStore; make one with: appstore admin-token")

    def report(self, device_id: str, token: str, raw: bytes) -> dict[str, Any]:
        self.authenticate_device(device_id, token)
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
        self.authenticate_admin(token)
        return fleet_view(self.repo, self.fleet)

    def samples(self, token: str, device: str | None, reason: str | None, limit: str | None) -> dict[str, Any]:
        self.authenticate_admin(token)
        try:
            count = int(limit) if limit else 100
        except ValueError:
            raise BadRequest(f"limit must be a whole number, not {limit!r}") from None
        return self.inbox.view(device or None, reason or None, count)


async def _capped_body(request: Request, cap: int, what: str) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise TooLarge(f"{what} is at most {cap} bytes")
    return body


def _proof(raw: bytes) -> DeviceProof:
    try:
        return DeviceProof.model_validate_json(raw)
    except ValidationError as e:
        raise BadRequest(describe_validation_error(e, "device proof", docs="docs/provisioning.md").replace("\n", "; ")
                         ) from e


async def _multipart(request: Request, limits: InboxLimits) -> FormData:
    """The request's parts, refusing (413) a body larger than the inbox takes before or while it is read."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise BadRequest("send the sample as multipart/form-data: a 'meta' part (the sample record, JSON) and, "
                         "unless the site sends metadata only, an 'image' part (JPEG)")
    cap = limits.max_body_bytes
    too_large = (f"the request is larger than {cap} bytes; the inbox takes images up to "
                 f"{limits.max_image_bytes} bytes ({limits.max_image_bytes / 2**20:g} MiB)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise TooLarge(too_large)

    async def capped() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise TooLarge(too_large)
            yield chunk

    try:
        async with aclosing(capped()) as stream:
            parser = MultiPartParser(request.headers, stream, max_files=2, max_fields=2,
                                     max_part_size=limits.max_meta_bytes)
            return await parser.parse()
    except MultiPartException as e:
        raise BadRequest(f"the multipart body is malformed: {e.message}") from e


async def _sample_parts(form: FormData) -> tuple[bytes, UploadFile | None]:
    metas, images = form.getlist("meta"), form.getlist("image")
    if len(metas) != 1 or len(images) > 1:
        raise BadRequest("send one 'meta' part (the sample record, JSON) and at most one 'image' part (JPEG), "
                         f"not {len(metas)} and {len(images)}")
    meta, image = metas[0], (images[0] if images else None)
    if isinstance(image, str):
        raise BadRequest("send 'image' as a file part (with a filename, e.g. ID.jpg), not as a form field")
    return (meta.encode() if isinstance(meta, str) else await meta.read()), image


def build_app(folder: Path, inbox_limits: InboxLimits | None = None) -> FastAPI:
    repo = Repository(folder)
    fleet = Fleet(repo.layout.fleet_db)
    inbox = Inbox(repo.layout, fleet, inbox_limits)
    bootstrap = Bootstrap(folder, fleet)
    api = FleetApi(repo, fleet, inbox, bootstrap)
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

    @app.put("/v1/devices/{device_id}/samples/{sample_id}")
    async def put_sample(device_id: str, sample_id: str, request: Request) -> JSONResponse:
        token = _bearer(request, "this device's token")
        await run_in_threadpool(api.authenticate_device, device_id, token)
        check_sample_id(sample_id)
        form = await _multipart(request, inbox.limits)
        try:
            meta, image = await _sample_parts(form)
            stored = await run_in_threadpool(inbox.receive, device_id, sample_id, meta,
                                             image.file if image is not None else None)
        finally:
            await form.close()
        if stored:
            return JSONResponse({"stored": True}, status_code=201)
        return JSONResponse({"stored": False, "duplicate": True}, status_code=200)

    @app.put("/v1/bootstrap/{serial}")
    async def put_bootstrap(serial: str, request: Request) -> dict[str, Any]:
        token = _bearer(request, "an admin token (made by: appstore admin-token)")
        raw = await _capped_body(request, MAX_BUNDLE_BYTES, "a provisioning bundle")
        result: dict[str, Any] = await run_in_threadpool(api.register, token, serial, raw)
        return result

    @app.post("/v1/bootstrap/{serial}")
    async def post_bootstrap(serial: str, request: Request) -> Response:
        proof = _proof(await _capped_body(request, MAX_PROOF_BYTES, "a device proof"))
        bundle: bytes = await run_in_threadpool(bootstrap.bundle_for, serial, proof)
        return Response(bundle, media_type="application/json")

    @app.post("/v1/enrol")
    async def post_enrol(request: Request) -> dict[str, Any]:
        proof = _proof(await _capped_body(request, MAX_PROOF_BYTES, "a device proof"))
        enrolment: Enrolment = await run_in_threadpool(bootstrap.enrol, proof)
        log.info("box enrolled as %s on channel %s", enrolment.device_id, enrolment.channel)
        return enrolment.model_dump()

    @app.get("/v1/samples")
    async def get_samples(request: Request) -> dict[str, Any]:
        token = _bearer(request, "an admin token (made by: appstore admin-token)")
        q = request.query_params
        result: dict[str, Any] = await run_in_threadpool(api.samples, token, q.get("device"), q.get("reason"),
                                                         q.get("limit"))
        return result

    app.mount("/metadata", StaticFiles(directory=repo.layout.metadata), name="metadata")
    app.mount("/targets", StaticFiles(directory=repo.layout.targets), name="targets")
    return app


BOOTSTRAP_PATHS = ("/v1/bootstrap/", "/v1/enrol")


def bootstrap_only(app: ASGIApp) -> ASGIApp:
    """The routes a box needs before it has a client certificate, and nothing else."""
    async def only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not str(scope["path"]).startswith(BOOTSTRAP_PATHS):
            await JSONResponse({"error": "this address serves only /v1/bootstrap and /v1/enrol; the rest is at the "
                                         "AppStore's main address, with a client certificate"}, status_code=404)(
                scope, receive, send)
            return
        await app(scope, receive, send)
    return only


@dataclass(frozen=True, slots=True)
class Tls:
    """``appstore serve`` over HTTPS; with ``client_certificates``, the main address takes only clients with a
    certificate from the fleet CA, and ``bootstrap_port`` serves enrolment and bootstrap without one."""

    cert_file: Path
    key_file: Path
    client_certificates: bool = False
    bootstrap_port: int | None = None


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8600, tls: Tls | None = None) -> None:
    import asyncio
    import ssl

    import uvicorn

    app = build_app(folder)
    scheme = "https" if tls else "http"
    print(f"serving {folder} at {scheme}://{host}:{port}/  (metadata/, targets/, /v1/devices, /v1/samples, "
          "/v1/bootstrap, /v1/enrol)", flush=True)
    if tls is None:
        uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
        return
    common: dict[str, Any] = {"host": host, "log_level": "info", "server_header": False, "timeout_graceful_shutdown": 5,
                              "ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    configs = [uvicorn.Config(app, port=port, **common)]
    if tls.client_certificates:
        ca = FleetCA(folder).certificate_file()
        configs = [uvicorn.Config(app, port=port, ssl_ca_certs=str(ca), ssl_cert_reqs=ssl.CERT_REQUIRED, **common)]
        print(f"  clients need a certificate from the fleet CA {ca}", flush=True)
    if tls.bootstrap_port is not None:
        configs.append(uvicorn.Config(bootstrap_only(app), port=tls.bootstrap_port, **common))
        print(f"  bootstrap and enrolment (no client certificate) at https://{host}:{tls.bootstrap_port}/", flush=True)

    async def run_all() -> None:
        await asyncio.gather(*(uvicorn.Server(c).serve() for c in configs))

    asyncio.run(run_all())
