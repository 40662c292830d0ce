"""Sends queued samples to the AppStore's inbox, as the site's privacy policy allows (docs/samples.md).

A background thread: every ``upload_interval_s`` (or when woken) it sends up to ``batch`` samples, the most
valuable first, each as an idempotent ``PUT .../samples/{id}``: a retry, after a lost answer or a restart,
is answered "duplicate" and never stored twice. Failures back off exponentially with jitter up to
``retry_max_s``; ``bandwidth_kbps`` caps the rate. With ``upload = "off"`` nothing is sent at all; with
``metadata-only`` no pixels leave; with ``full`` the regions of ``redact_labels`` are blurred first.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import asdict, dataclass

from PIL import Image

from appliance.logs import ThrottledLog
from appliance.samples.redact import redact
from appliance.samples.spool import Spool, image_info
from appliance.settings import SamplesSettings
from appliance.status import UploaderStatus
from appliance.store import SpooledSample, Store
from appstore_client.errors import FleetError, Refused
from appstore_client.fleet import FleetClient
from common.backoff import Backoff
from formats.errors import FormatError
from formats.sample import SampleRecord

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)


@dataclass(slots=True)
class UploadState:
    state: str = "off"  # off, idle, uploading, retrying, no AppStore
    uploaded: int = 0  # since the daemon started
    refused: int = 0  # since the daemon started: records the AppStore refused as malformed (not sent again)
    last_refusal: str = ""  # the AppStore's reason for the last one
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

    def status(self) -> UploaderStatus:
        return UploaderStatus(**asdict(self.state), policy=self._settings.upload,
                              redact=tuple(self._settings.redact_labels))

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
                delay = Backoff(base_s=1.0, max_s=self._settings.retry_max_s).delay(failures)
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
        for sample in self._store.samples.queued(self._settings.batch):
            if self._stop.is_set():
                break
            self.state.state = "uploading"
            try:
                self._send(sample)
            except Refused as e:
                if not e.permanent:
                    raise  # authentication, rate or size limits: the same record may pass later
                self._refuse(sample, e.reason)
                continue
            except FormatError as e:  # a spooled record this version cannot read: sending it cannot help
                self._refuse(sample, str(e))
                continue
            self._spool.uploaded(sample.id)
            sent += 1
            self.state.uploaded += 1
            self.state.last_upload = time.time()
            self.state.last_error = ""
        return sent

    def _refuse(self, sample: SpooledSample, reason: str) -> None:
        """A malformed record is set aside with its reason, counted and shown; the queue moves on."""
        self._spool.refused(sample.id, reason)
        self.state.refused += 1
        self.state.last_refusal = reason
        _throttled.warning(("refused", sample.app, sample.reason), "sample %s of %s (%s) refused by the AppStore "
                           "and set aside, not sent again: %s", sample.id, sample.app, sample.reason, reason)

    def _send(self, sample: SpooledSample) -> None:
        assert self._fleet is not None
        s = self._settings
        record = SampleRecord.parse(sample.meta_json.encode(), f"spooled sample {sample.id}")
        image = self._spool.image(sample.id) if s.upload == "full" else None
        redacted: list[str] = []
        if image is not None and s.redact_labels:
            image = redact(image, record.predictions, s.redact_labels, s.jpeg_quality)
            redacted = list(s.redact_labels)
        info = None
        if image is not None:
            with Image.open(io.BytesIO(image)) as im:
                info = image_info(image, *im.size)
        record = record.model_copy(update={"image": info, "privacy": s.upload, "redacted": redacted})
        self._throttle(len(record.to_json()) + len(image or b""))
        self._store.samples.mark_attempted(sample.id)
        self._fleet.put_sample(record, image)  # a duplicate answer also means delivered

    def _throttle(self, size: int) -> None:
        kbps = self._settings.bandwidth_kbps
        if kbps > 0:
            self._stop.wait(size * 8 / 1000 / kbps)  # the time these bytes take at the cap
