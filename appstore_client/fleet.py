"""The appliance's side of the AppStore's fleet API: status reports and hard samples (docs/appstore.md,
docs/samples.md), both authenticated with the device token from enrolment, and provisioning's bootstrap and
enrolment (docs/provisioning.md), authenticated by a proof of the box's factory identity; all over the one
:class:`~appstore_client.connection.Connection` the TUF fetcher uses too."""

from __future__ import annotations

import json
from typing import Any

import urllib3
from pydantic import ValidationError

from appstore_client.connection import Connection
from appstore_client.errors import FleetError, Refused, Unreachable
from formats.provisioning import DeviceProof, Enrolment
from formats.sample import SampleRecord

__all__ = ["FleetClient", "FleetError", "Refused", "Unreachable", "enrol", "fetch_bundle"]


class FleetClient:
    def __init__(self, connection: Connection, device_id: str, token: str) -> None:
        self._conn = connection
        self._path = f"v1/devices/{device_id}"
        self._headers = {"Authorization": f"Bearer {token}"}

    def report(self, body: dict[str, Any]) -> None:
        """``POST .../status``: the appliance's versions, health and last error."""
        self._call("POST", f"{self._path}/status", body=json.dumps(body).encode(),
                   headers={**self._headers, "Content-Type": "application/json"})

    def put_sample(self, record: SampleRecord, image: bytes | None) -> bool:
        """``PUT .../samples/{id}``, idempotent: True when stored now, False when the inbox already had it."""
        fields: dict[str, Any] = {"meta": ("meta.json", record.to_json().encode(), "application/json")}
        if image is not None:
            fields["image"] = (f"{record.id}.jpg", image, "image/jpeg")
        r = self._call("PUT", f"{self._path}/samples/{record.id}", fields=fields, headers=self._headers)
        return r.status == 201

    def _call(self, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        return _call(self._conn, method, path, " (check appstore.device_token)", **kwargs)


def fetch_bundle(connection: Connection, serial: str, proof: DeviceProof) -> bytes | None:
    """``POST /v1/bootstrap/{serial}``: the provisioning bundle the owner registered for this box (None: none
    yet), for a proof of its factory identity (docs/provisioning.md)."""
    try:
        r = _call(connection, "POST", f"v1/bootstrap/{serial}", "", body=proof.model_dump_json().encode(),
                  headers={"Content-Type": "application/json"})
    except Refused as e:
        if e.status == 404:
            return None
        raise
    return bytes(r.data)


def enrol(connection: Connection, proof: DeviceProof) -> Enrolment:
    """``POST /v1/enrol``: this box's operational identity in the fleet, for a proof of its factory identity.
    Idempotent: asked again, the AppStore answers the same device (with a new token)."""
    r = _call(connection, "POST", "v1/enrol", "", body=proof.model_dump_json().encode(),
              headers={"Content-Type": "application/json"})
    try:
        return Enrolment.model_validate_json(r.data)
    except ValidationError as e:
        raise Refused(f"the AppStore's enrolment answer is not one: {e.errors()[0]['msg']}", r.status, "") from e


def _call(conn: Connection, method: str, path: str, hint: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
    try:
        r = conn.request(method, path, **kwargs)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise Unreachable(conn.describe(e)) from e
    if r.status >= 400:
        reason = _reason(r.data)
        extra = hint if r.status in (401, 403) else ""
        raise Refused(f"the AppStore refused {method} {path}: HTTP {r.status} {reason}{extra}", r.status, reason)
    return r


def _reason(body: bytes) -> str:
    """The AppStore's ``{"error": "..."}``, or the start of whatever else it answered."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])[:500]
    return body[:200].decode(errors="replace")
