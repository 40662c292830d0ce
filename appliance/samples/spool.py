"""The spool: hard samples on disk (``state_dir/samples/{id}.jpg``) with their index in SQLite.

A capture writes the frame atomically, then indexes it within the quota (bytes and count) in one
transaction that drops the least valuable queued samples first (random, then by class, then near the
threshold; operators' flags last), counting every drop by reason. A capture is refused, and counted, when
the disk has less than ``min_free_bytes`` free: the spool never fills the disk. Blocking: call from a thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from appliance.samples.policy import PRIORITY
from appliance.settings import SamplesSettings
from appliance.store import SpooledSample, Store
from common.files import write_atomically
from formats.sample import ImageInfo, Prediction, Reason, SampleRecord

log = logging.getLogger(__name__)

UPLOADED_KEPT_S = 7 * 86400  # the index of uploaded samples (for the counts) is kept this long


class Spool:
    def __init__(self, store: Store, settings: SamplesSettings, folder: Path, device_id: str) -> None:
        self._store = store
        self._settings = settings
        self.folder = folder
        self._device = device_id
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, sample_id: str) -> Path:
        return self.folder / f"{sample_id}.jpg"

    def capture(self, *, app: str, app_version: str, model: str, source: str, reason: Reason, frame: bytes,
                predictions: Sequence[Prediction], ts: float | None = None) -> str | None:
        """Keep ``frame`` as a sample; its id, or None when it was not kept (no room, or not an image)."""
        s = self._settings
        if shutil.disk_usage(self.folder).free < s.min_free_bytes:
            self._store.samples.count_drop(reason)
            log.warning("sample of %s on %s not kept: less than %d MB free on disk", app, source,
                        s.min_free_bytes // 2**20)
            return None
        try:
            jpeg, width, height = _normalise(frame, s.max_side, s.jpeg_quality)
        except (OSError, ValueError) as e:
            log.warning("sample of %s on %s not kept: the frame does not decode (%s)", app, source, e)
            return None
        sample_id = uuid.uuid4().hex
        when = ts or time.time()
        meta = SampleRecord(id=sample_id, device=self._device, site=s.site, app=app, app_version=app_version,
                            model=model, source=source, ts=when, reason=reason, predictions=list(predictions),
                            image=image_info(jpeg, width, height))
        write_atomically(self.path(sample_id), jpeg)
        record = SpooledSample(sample_id, when, app, source, reason, PRIORITY.get(reason, 0), len(jpeg),
                               meta.to_json())
        kept, dropped = self._store.samples.add(record, s.quota_bytes, s.quota_count)
        for victim in dropped:
            self.path(victim).unlink(missing_ok=True)
        if not kept:
            self.path(sample_id).unlink(missing_ok=True)
            log.info("sample of %s on %s (%s) not kept: the spool is full of more valuable ones", app, source, reason)
            return None
        return sample_id

    def image(self, sample_id: str) -> bytes | None:
        try:
            return self.path(sample_id).read_bytes()
        except FileNotFoundError:
            return None

    def uploaded(self, sample_id: str) -> None:
        """Sent: the frame leaves the disk, the index row stays for the counts (a week)."""
        self._store.samples.mark_uploaded(sample_id)
        self.path(sample_id).unlink(missing_ok=True)

    def refused(self, sample_id: str, reason: str) -> None:
        """The AppStore refused the record as malformed: never sent again; the row keeps its reason (a week)."""
        self._store.samples.mark_refused(sample_id, reason)
        self.path(sample_id).unlink(missing_ok=True)

    def tidy(self) -> None:
        """At start: apply the quota (it may have been lowered since), then remove frames no queued index row
        knows (a crash between write and index), half-written files and old uploaded or refused rows."""
        s = self._settings
        dropped = self._store.samples.enforce_quota(s.quota_bytes, s.quota_count)
        if dropped:
            log.info("%d queued samples dropped to fit the quota (%d MB, %d samples)", len(dropped),
                     s.quota_bytes // 2**20, s.quota_count)
        known = self._store.samples.queued_ids()
        for f in self.folder.glob("*.jpg"):
            if f.stem not in known:
                f.unlink(missing_ok=True)
        for f in self.folder.glob(".*.tmp"):
            f.unlink(missing_ok=True)
        self._store.samples.prune_uploaded(time.time() - UPLOADED_KEPT_S)


def image_info(jpeg: bytes, width: int, height: int) -> ImageInfo:
    return ImageInfo(sha256=hashlib.sha256(jpeg).hexdigest(), bytes=len(jpeg), width=width, height=height)


def _normalise(frame: bytes, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """The frame as a JPEG no larger than ``max_side``: as received when it already is one."""
    with Image.open(io.BytesIO(frame)) as im:
        width, height = im.size
        if im.format == "JPEG" and max(width, height) <= max_side:
            return frame, width, height
        img = im.convert("RGB")
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        img = img.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue(), img.width, img.height
