"""The sample inbox (docs/samples.md): hard samples the devices send, kept as files and indexed in fleet.db.

``PUT /v1/devices/{device}/samples/{sample_id}`` hands each delivery to :meth:`Inbox.receive`;
``GET /v1/samples`` and ``appstore samples`` read :meth:`Inbox.view`::

    inbox = Inbox(repo.layout, Fleet(repo.layout.fleet_db))
    with open("frame.jpg", "rb") as image:
        stored = inbox.receive("ward-7", sample_id, meta_json, image)  # False: already delivered
    inbox.view(reason="near_threshold")["counts"]

A sample is stored once. Its files are written under temporary names, then renamed into place inside the
transaction that adds its index row; the first delivery of a (device, id) gets the row, every later one
finds it taken and leaves the first copy as it was. ``samples/`` is never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appstore.errors import BadRequest, RepoError, TooLarge
from appstore.fleet import Fleet, SampleRow
from appstore.layout import Layout
from common.files import fsync_dir, staged_file
from formats.errors import FormatError
from formats.sample import REASONS, SAMPLE_ID_PATTERN, ImageInfo, SampleRecord

SAMPLE_ID = re.compile(SAMPLE_ID_PATTERN)
JPEG_START = b"\xff\xd8\xff"
_CHUNK = 1024 * 1024  # bytes copied at a time while an image is hashed and staged


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """What the inbox accepts."""

    max_image_bytes: int = 16 * 1024 * 1024  # bytes; a larger image is refused with 413
    max_meta_bytes: int = 256 * 1024  # bytes; a record is a few KB, a larger one is refused with 400
    max_list: int = 1000  # samples in one listing

    @property
    def max_body_bytes(self) -> int:
        """The most a PUT may send: both parts and room for the multipart headers and boundaries."""
        return self.max_image_bytes + self.max_meta_bytes + 16 * 1024


def check_sample_id(sample_id: str) -> None:
    if not SAMPLE_ID.fullmatch(sample_id):
        raise BadRequest(f"sample id {sample_id!r} is not valid; use 8 to 64 of A-Z a-z 0-9 _ - "
                         "(the appliance uses 32 hex digits)")


def parse_record(raw: bytes) -> SampleRecord:
    try:
        return SampleRecord.parse(raw, "meta")
    except FormatError as e:
        raise BadRequest(str(e).replace("\n", "; ")) from e


class Inbox:
    """The inbox of one AppStore folder: files under ``samples/``, their index in ``fleet.db``."""

    def __init__(self, layout: Layout, fleet: Fleet, limits: InboxLimits | None = None) -> None:
        self.layout = layout
        self.fleet = fleet
        self.limits = limits or InboxLimits()

    def receive(self, device: str, sample_id: str, meta: bytes, image: BinaryIO | None) -> bool:
        """Store a sample that ``device`` (already authenticated) sent; False when it had already sent that id.

        The whole delivery is checked first (400, or 413 for a too large image), so a bad one stores nothing.
        """
        check_sample_id(sample_id)
        record = self._check_record(device, sample_id, meta, image is not None)
        folder = self.layout.samples / device
        staged: list[tuple[Path, Path]] = []  # (temporary file, final name), the image first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if image is not None:
                assert record.image is not None
                staged.append((self._stage_image(folder, sample_id, image, record.image),
                               folder / f"{sample_id}.jpg"))
            staged.append((_stage(folder, sample_id, meta), folder / f"{sample_id}.json"))
            row = SampleRow(device, sample_id, time.time(), record.reason, image is not None, meta.decode())
            return self.fleet.add_sample(row, lambda: _place(folder, staged))
        except (OSError, sqlite3.Error) as e:
            raise RepoError(f"cannot store sample {sample_id} of {device} in {folder}: {e}") from e
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)

    def view(self, device: str | None = None, reason: str | None = None, limit: int = 100) -> dict[str, Any]:
        """The newest samples first, and how many there are per device and per reason (not only those listed)."""
        if reason and reason not in REASONS:
            raise BadRequest(f"reason {reason!r} is not one of {', '.join(REASONS)}")
        if not 1 <= limit <= self.limits.max_list:
            raise BadRequest(f"limit must be 1 to {self.limits.max_list}, not {limit}")
        try:
            rows = self.fleet.samples(device, reason, limit)
            counts = self.fleet.sample_counts(device, reason)
        except sqlite3.Error as e:
            raise RepoError(f"cannot read the sample index in {self.fleet.path}: {e}") from e
        by_device: Counter[str] = Counter()
        by_reason: Counter[str] = Counter()
        for d, r, n in counts:
            by_device[d] += n
            by_reason[r] += n
        return {"samples": [{"meta": json.loads(r.meta), "received": r.received, "has_image": r.has_image}
                            for r in rows],
                "total": sum(by_device.values()),
                "counts": {"device": dict(sorted(by_device.items())), "reason": dict(sorted(by_reason.items()))}}

    def _check_record(self, device: str, sample_id: str, meta: bytes, has_image: bool) -> SampleRecord:
        if len(meta) > self.limits.max_meta_bytes:
            raise BadRequest(f"meta is {len(meta)} bytes; at most {self.limits.max_meta_bytes} are accepted")
        try:
            meta.decode()
        except UnicodeDecodeError as e:
            raise BadRequest("meta is not UTF-8 JSON") from e
        record = parse_record(meta)
        if record.id != sample_id:
            raise BadRequest(f"meta says id {record.id!r} but was sent as {sample_id!r}; "
                             "send it to /v1/devices/<device>/samples/<its id>")
        if record.device != device:
            raise BadRequest(f"meta says device {record.device!r} but was sent for {device!r}; "
                             "a device sends only its own samples")
        if has_image and record.image is None:
            raise BadRequest("an image was sent but meta.image is null; describe it there (sha256, bytes, width, "
                             "height) or send no image")
        if not has_image and record.image is not None:
            raise BadRequest("meta.image describes an image but no 'image' part was sent; send it, or set "
                             "meta.image to null for a metadata-only sample")
        return record

    def _stage_image(self, folder: Path, sample_id: str, image: BinaryIO, expected: ImageInfo) -> Path:
        """Copy the image to a temporary file beside its final name, checking its size and sha256 on the way."""
        limit = self.limits.max_image_bytes
        digest = hashlib.sha256()
        size = 0
        head = b""
        with staged_file(folder, f"{sample_id}.jpg", mode=0o600) as (out, tmp):
            while chunk := image.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the image is larger than {limit} bytes ({limit / 2**20:g} MiB), the "
                                   "most this inbox accepts; send a smaller JPEG")
                head = head or chunk[:len(JPEG_START)]
                digest.update(chunk)
                out.write(chunk)
            if size != expected.size:
                raise BadRequest(f"the image is {size} bytes but meta.image.bytes says {expected.size}")
            if digest.hexdigest() != expected.sha256.lower():
                raise BadRequest(f"the image's sha256 is {digest.hexdigest()} but meta.image.sha256 says "
                                 f"{expected.sha256}; it was damaged on the way or meta describes another image")
            if head != JPEG_START:
                raise BadRequest("the image is not a JPEG; send the frame as image/jpeg")
        return tmp


def _stage(folder: Path, sample_id: str, data: bytes) -> Path:
    with staged_file(folder, f"{sample_id}.json", mode=0o600) as (out, tmp):
        out.write(data)
    return tmp


def _place(folder: Path, staged: list[tuple[Path, Path]]) -> None:
    """Rename the staged files to their names (the JSON last: it marks a complete sample), or none of them."""
    placed: list[Path] = []
    try:
        for tmp, final in staged:
            os.replace(tmp, final)
            placed.append(final)
        fsync_dir(folder)  # the renames reach the disk before the index row is committed
    except BaseException:
        for final in placed:
            final.unlink(missing_ok=True)
        raise
