"""The support bundle behind "Download diagnostics": what remote support needs, without secrets.

A zip with ``status.json`` (what ``appliance status`` shows), ``settings.json`` (the configuration in
force, every password, secret and token replaced by ``<redacted>``), ``logs.txt`` (the daemon's recent
log lines; secrets are never logged), ``audit.json`` (the recent audit log), ``hardware.json`` and
``versions.json``. Built in memory: a bundle is a few hundred kilobytes.
"""

from __future__ import annotations

import io
import json
import platform
import re
import time
import zipfile
from collections.abc import Callable
from importlib import metadata
from typing import Any

from appliance import __version__
from appliance.settings import Settings
from appliance.status import DaemonStatus
from appliance.store import Store

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"password|secret|token|passphrase|private", re.IGNORECASE)
AUDIT_LINES = 500
PACKAGES = ("fastapi", "uvicorn", "onnxruntime-gpu", "onnxruntime", "numpy", "pillow", "paho-mqtt", "amqtt",
            "sqlite-utils", "pydantic", "cryptography", "jinja2", "babel")


def redact(value: Any) -> Any:
    """``value`` with every entry whose key names a secret replaced (recursively)."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _versions() -> dict[str, Any]:
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"appliance": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "packages": found}


def build_bundle(settings: Settings, store: Store, status: Callable[[], DaemonStatus],
                 logs: Callable[[], list[str]], hardware: Callable[[], dict[str, Any]]) -> bytes:
    files: dict[str, str] = {
        "status.json": status().model_dump_json(indent=1),
        "settings.json": json.dumps(redact(settings.model_dump(mode="json")), indent=1),
        "logs.txt": "\n".join(logs()) + "\n",
        "audit.json": json.dumps([{"ts": a.ts, "actor": a.actor, "action": a.action, "detail": dict(a.detail),
                                   "address": a.address} for a in store.audit_log.recent(limit=AUDIT_LINES)],
                                 indent=1, default=str),
        "hardware.json": json.dumps(hardware(), indent=1, default=str),
        "versions.json": json.dumps(_versions(), indent=1),
    }
    buf = io.BytesIO()
    stamp = time.localtime()[:6]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)
    return buf.getvalue()
