"""The appliance's side of the AppStore's fleet API: status reports and hard samples (docs/appstore.md,
docs/samples.md), both authenticated with the device token from enrolment (settings until provisioning)."""

from __future__ import annotations

import json
from typing import Any

import urllib3

from appstore_client.errors import FleetError

__all__ = ["FleetClient", "FleetError"]

TIMEOUT_S = 30.0


class FleetClient:
    def __init__(self, url: str, device_id: str, token: str, pool: urllib3.PoolManager | None = None) -> None:
        self._base = f"{url.rstrip('/')}/v1/devices/{device_id}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._pool = pool or urllib3.PoolManager(retries=False)

    def report(self, body: dict[str, Any]) -> None:
        """``POST .../status``: the appliance's versions, health and last error."""
        self._call("POST", f"{self._base}/status", body=json.dumps(body).encode(),
                   headers={**self._headers, "Content-Type": "application/json"})

    def put_sample(self, sample_id: str, meta: dict[str, Any], image: bytes | None) -> bool:
        """``PUT .../samples/{id}``, idempotent: True when stored now, False when the inbox already had it."""
        fields: dict[str, Any] = {"meta": ("meta.json", json.dumps(meta).encode(), "application/json")}
        if image is not None:
            fields["image"] = (f"{sample_id}.jpg", image, "image/jpeg")
        r = self._call("PUT", f"{self._base}/samples/{sample_id}", fields=fields, headers=self._headers)
        return r.status == 201

    def _call(self, method: str, url: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        try:
            r = self._pool.request(method, url, timeout=TIMEOUT_S, **kwargs)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise FleetError(f"the AppStore cannot be reached ({type(e).__name__}: {e})") from e
        if r.status >= 400:
            hint = " (check appstore.device_token)" if r.status in (401, 403) else ""
            raise FleetError(f"the AppStore refused {method} {url.rsplit('/v1/', 1)[-1]}: HTTP {r.status} "
                             f"{r.data[:200].decode(errors='replace')}{hint}")
        return r
