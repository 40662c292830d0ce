"""Sends queued samples to the AppStore's inbox, as the site's privacy policy allows (docs/samples.md).

A background thread: every ``upload_interval_s`` (or when woken) it sends up to ``batch`` samples, the most
valuable first, each as an idempotent ``PUT .../samples/{id}``: a retry, after a lost answer or a restart,
is answered "duplicate" and never stored twice. Failures back off exponentially with jitter up to
``retry_max_s``; ``bandwidth_kbps`` caps the rate. With ``upload = "off"`` nothing is sent at all; with
``metadata-only`` no pixels leave; with ``full`` the regions of ``redact_labels`` are blurred first.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from appliance.samples.redact import redact
from appliance.samples.spool import Spool
from appliance.settings import SamplesSettings
from appliance.store import SampleRecord, Store
from appstore_client.fleet import FleetClient, FleetError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UploadState:
    state: str = "off"  # off, idle, uploading, retrying, no AppStore
    uploaded: int = 0  # since the daemon started
    last_upload: float | None = None
    last_error: str = ""
    next_try_s: float | None = None


class Uploader:
    def __init__(self, spool: Spool, store: Store, settings: SamplesSettings, fleet: FleetClient | None) -> None:
        self._spool, self._store, self._settings = spool, store, settings
        self._fleet = fleet  # None: no AppStore to send to
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state = UploadState()
        if settings.upload == "off":
            self.state.state = "off"
        elif fleet is None:
            self.state.state = "no AppStore"
        else:
            self.state.state = "idle"

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.state), "policy": self._settings.upload, "redact": list(self._settings.redact_labels)}

    def start(self) -> None:
        if self.state.state in ("off", "no AppStore"):
            return  # nothing ever leaves the site
        self._thread = threading.Thread(target=self._run, name="sample-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(35.0)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                sent = self.run_once()
                failures = 0
                delay = 0.0 if sent >= self._settings.batch else self._settings.upload_interval_s
                self.state.state = "idle"
            except (FleetError, OSError) as e:
                failures += 1
                delay = min(self._settings.retry_max_s, 1.0 * 2 ** (failures - 1)) * (0.5 + random.random())
                self.state.state, self.state.last_error = "retrying", str(e)
                log.warning("sample upload failed (%s); trying again in %.1f s", e, delay)
            self.state.next_try_s = round(delay, 1)
            self._wake.wait(delay)
            self._wake.clear()

    def run_once(self) -> int:
        """Send up to one batch; how many were delivered. Raises on the first failure (the rest wait)."""
        if self._settings.upload == "off" or self._fleet is None:
            return 0  # the site's policy: nothing leaves
        sent = 0
        for sample in self._store.queued_samples(self._settings.batch):
            if self._stop.is_set():
                break
            self.state.state = "uploading"
            self._send(sample)
            self._spool.uploaded(sample.id)
            sent += 1
            self.state.uploaded += 1
            self.state.last_upload = time.time()
            self.state.last_error = ""
        return sent

    def _send(self, sample: SampleRecord) -> None:
        assert self._fleet is not None
        meta = json.loads(sample.meta_json)
        image = self._spool.image(sample.id) if self._settings.upload == "full" else None
        if image is not None and self._settings.redact_labels:
            image = redact(image, meta.get("predictions", []), self._settings.redact_labels,
                           self._settings.jpeg_quality)
            meta["redacted"] = list(self._settings.redact_labels)
        if image is not None:
            with Image.open(io.BytesIO(image)) as im:
                width, height = im.size
            meta["image"] = {"sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image), "width": width,
                             "height": height}
        else:
            meta["image"] = None
        meta["privacy"] = self._settings.upload
        self._throttle(len(json.dumps(meta)) + len(image or b""))
        self._store.sample_attempted(sample.id)
        self._fleet.put_sample(sample.id, meta, image)  # a duplicate answer also means delivered

    def _throttle(self, size: int) -> None:
        kbps = self._settings.bandwidth_kbps
        if kbps > 0:
            self._stop.wait(size * 8 / 1000 / kbps)  # the time these bytes take at the cap
