"""Where samples come from: the pipeline's results (by the app's policy) and operators' flags.

:meth:`SampleCapture.on_result` runs on the event loop for every camera result: the policy decides at
once (no I/O) and a kept frame is written on a worker thread, at most ``MAX_PENDING`` at a time (beyond
that a sample is skipped rather than queued: the pipeline never waits for the disk). Operators' flags
(:meth:`flag_event`, :meth:`flag_frame`) come from the console's threads and write directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from appliance.events import frame_file
from appliance.ingest.ingest import Frame
from appliance.logs import ThrottledLog
from appliance.runtime.results import Detection
from appliance.samples.policy import Chooser, effective_policy
from appliance.samples.spool import Spool
from appliance.status import SampleCounts, SampleQuota, SamplesStatus, UploaderStatus
from appliance.store import EventRecord, Store
from formats.app_manifest import AppManifest, SamplePolicyOverride
from formats.sample import Prediction, Reason

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)

MAX_PENDING = 4


class SampleCapture:
    def __init__(self, spool: Spool, store: Store, state_dir: Path,
                 overrides: Mapping[str, SamplePolicyOverride]) -> None:
        self.spool = spool
        self._store = store
        self._state_dir = state_dir
        self._overrides = overrides
        self._chooser = Chooser(overrides)
        self._pending = 0
        self.skipped_busy = 0
        self.failed = 0  # samples the spool could not write (logged once a minute per cause)
        self.on_captured: list[Any] = []  # callables, e.g. waking the uploader

    def status(self, uploader: UploaderStatus, quota: SampleQuota) -> SamplesStatus:
        """The samples part of status: what the spool holds and dropped, by reason, and the upload's state."""
        counts = self._store.samples.counts()
        return SamplesStatus(by_reason={r: SampleCounts(**c) for r, c in counts["by_reason"].items()},
                             dropped=dict(counts["dropped"]), uploader=uploader, skipped_busy=self.skipped_busy,
                             quota=quota)

    def on_result(self, manifest: AppManifest, frame: Frame, detections: list[Detection]) -> None:
        if frame.kind != "camera":
            return
        chosen = self._chooser.choose(manifest, frame.source, detections, frame.captured)
        if chosen is None:
            return
        if self._pending >= MAX_PENDING:
            self.skipped_busy += 1
            return
        reason, _label = chosen
        self._pending += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, lambda: self._keep(
            manifest.name, manifest.version, manifest.model.key, frame.source, reason, frame.data,
            [d.prediction() for d in detections], frame.captured))
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[str | None]) -> None:
        self._pending -= 1
        error = future.exception()
        if error is not None:
            self.failed += 1
            _throttled.error(("keep", type(error).__name__), "could not keep a sample: %s: %s", type(error).__name__,
                             error)

    def _keep(self, app: str, app_version: str, model: str, source: str, reason: Reason, frame: bytes,
              predictions: list[Prediction], ts: float | None) -> str | None:
        sample_id = self.spool.capture(app=app, app_version=app_version, model=model, source=source, reason=reason,
                                       frame=frame, predictions=predictions, ts=ts)
        if sample_id is not None:
            for callback in self.on_captured:
                callback()
        return sample_id

    def flag_event(self, event: EventRecord, reason: Literal["false_positive", "missed_detection"]) -> str | None:
        """An operator marked an alert a false positive or a missed detection: keep its clean frame."""
        if not event.snapshot:
            return None
        frame_path = self._state_dir / frame_file(event.snapshot)
        if not frame_path.is_file():
            return None  # a telemetry alert, or an alert from before frames were kept
        app = self._store.apps.get(event.app)
        manifest = AppManifest.parse(app.manifest_json.encode(), event.app) if app is not None else None
        if manifest is not None and not getattr(effective_policy(manifest, self._overrides), reason):
            return None  # the app's policy does not keep these
        prediction = Prediction.model_validate({"label": event.label, "score": event.score, "box": event.box})
        return self._keep(event.app, manifest.version if manifest else "", manifest.model.key if manifest else "",
                          event.source, reason, frame_path.read_bytes(), [prediction], event.ts)

    def flag_frame(self, source: str, frame: bytes, label: str) -> str | None:
        """An operator saw something on a camera's latest frame that no app flagged."""
        return self._keep("(reported)", "", "", source, "missed_detection", frame,
                          [Prediction(label=label or "missed", score=0.0)], None)
