"""The daemon's HTTP server (FastAPI): health, Prometheus metrics and the status API.

The console issue builds the UI on this same server. It binds to loopback by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from appliance.metrics import Metrics


def build_app(status: Callable[[], dict[str, Any]], metrics: Metrics, healthy: Callable[[], tuple[bool, str]]) -> FastAPI:
    app = FastAPI(title="Edge appliance", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> Response:
        ok, reason = healthy()
        return JSONResponse({"status": "ok" if ok else "degraded", "reason": reason}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/status")
    def api_status() -> dict[str, Any]:
        return status()

    return app
