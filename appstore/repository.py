"""The TUF repository on disk: create it, read its current state, change targets and re-sign.

Every change goes through :meth:`Repository.edit_targets`, which holds the folder's lock, lets the caller
add targets, then signs targets → snapshot → timestamp in :meth:`Repository._sign_and_write`, the one
place metadata is signed after ``keys init``. Consistent snapshots: ``N.targets.json``,
``N.snapshot.json``, hash-prefixed target files; only ``timestamp.json`` is rewritten in place::

    repo = Repository(Path("appstore-repo"))
    with repo.edit_targets() as edit:
        edit.put("apps/ppe-watch/1.0.0/app.json", raw, {"kind": "app", ...})
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import Signer
from tuf.api.exceptions import LengthOrHashMismatchError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from appstore import keys
from appstore.errors import RepoError
from appstore.layout import Expiry, Layout
from common.files import write_atomically

T = TypeVar("T", Root, Timestamp, Snapshot, Targets)

_SERIALIZER = JSONSerializer(compact=False)
_ROOT_FILE = re.compile(r"^([1-9][0-9]*)\.root\.json$")
ROOT_WARNING = timedelta(days=30)  # `timestamp refresh` warns when root expires sooner than this


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_file(version: int, raw: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(raw), hashes={"sha256": _sha256(raw)})


def _check_target_path(path: str) -> None:
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ValueError(f"bad target path {path!r}")


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What ``refresh`` re-signed."""

    timestamp_version: int
    timestamp_expires: datetime
    resigned_targets: bool  # targets and snapshot were close to expiry and were re-signed too
    root_expires: datetime


class TargetsEditor:
    """Changes to targets inside :meth:`Repository.edit_targets`; files are stored as they are added."""

    def __init__(self, layout: Layout, targets: Targets) -> None:
        self._layout = layout
        self.targets = targets
        self.changed = False

    def get(self, path: str) -> TargetFile | None:
        return self.targets.targets.get(path)

    def read(self, path: str) -> bytes:
        return _read_target(self._layout, self.targets, path)

    def put(self, path: str, data: bytes, custom: dict[str, Any]) -> TargetFile:
        """Add or replace target ``path``; its file is written under its hash-prefixed name."""
        _check_target_path(path)
        target = TargetFile.from_data(path, data, ["sha256"])
        target.unrecognized_fields["custom"] = custom
        stored = self._layout.target_file(path, target.hashes["sha256"])
        if not stored.is_file():
            write_atomically(stored, data)
        self.targets.targets[path] = target
        self.changed = True
        return target


def _read_target(layout: Layout, targets: Targets, path: str) -> bytes:
    target = targets.targets.get(path)
    if target is None:
        raise KeyError(path)
    stored = layout.target_file(path, target.hashes["sha256"])
    try:
        data = stored.read_bytes()
        target.verify_length_and_hashes(data)
    except (OSError, LengthOrHashMismatchError) as e:
        raise RepoError(f"{stored} is missing or does not match targets metadata ({e}); "
                        "restore it from a backup or publish the target again under a new version") from e
    return data


class Repository:
    """An existing repository folder (see :mod:`appstore.layout`)."""

    def __init__(self, folder: Path) -> None:
        self.layout = Layout(folder)
        self.layout.require()

    @classmethod
    def create(cls, folder: Path, root_threshold: int = 2, root_keys: int = 3,
               expiry: Expiry | None = None) -> tuple[Repository, list[Path]]:
        """Generate keys and write version 1 of every role; returns the repository and the root key files."""
        layout = Layout(folder)
        if layout.exists() or (layout.keys.is_dir() and any(layout.keys.iterdir())):
            raise RepoError(f"{folder} already holds a repository or keys; refusing to overwrite them "
                            "(choose another --repo folder)")
        if not 1 <= root_threshold <= root_keys:
            raise RepoError(f"--root-threshold {root_threshold} must be between 1 and --root-keys {root_keys}")
        expiry = expiry or Expiry()
        layout.folder.mkdir(parents=True, exist_ok=True)
        layout.write_expiry(expiry)
        now = _now()
        root = Root(expires=now + expiry.of("root"), consistent_snapshot=True)
        root.roles[Root.type].threshold = root_threshold
        root_signers: list[Signer] = []
        root_files: list[Path] = []
        for i in range(1, root_keys + 1):
            signer = keys.generate()
            root.add_key(signer.public_key, Root.type)
            root_files.append(layout.keys / f"root-{i}.json")
            keys.save(root_files[-1], Root.type, signer)
            root_signers.append(signer)
        for role in keys.ONLINE_ROLES:
            signer = keys.generate()
            root.add_key(signer.public_key, role)
            keys.save(layout.keys / f"{role}.json", role, signer)
        layout.metadata.mkdir(parents=True, exist_ok=True)
        layout.targets.mkdir(parents=True, exist_ok=True)
        with layout.locked():
            targets = Metadata(Targets(version=1))
            _sign_and_write(layout, root, targets, expiry, now)
            root_md = Metadata(root)
            for root_signer in root_signers:
                root_md.sign(root_signer, append=True)
            write_atomically(layout.metadata / "1.root.json", root_md.to_bytes(_SERIALIZER))  # last: marks it complete
        return cls(folder), root_files

    # reading the current state (no lock: versioned files are never rewritten, timestamp.json is replaced atomically)

    def root(self) -> Metadata[Root]:
        versions = [int(m.group(1)) for p in self.layout.metadata.iterdir() if (m := _ROOT_FILE.match(p.name))]
        return _load(self.layout.metadata / f"{max(versions)}.root.json", Root)

    def timestamp(self) -> Metadata[Timestamp]:
        return _load(self.layout.metadata / "timestamp.json", Timestamp)

    def snapshot(self) -> Metadata[Snapshot]:
        version = self.timestamp().signed.snapshot_meta.version
        return _load(self.layout.metadata / f"{version}.snapshot.json", Snapshot)

    def targets(self) -> Metadata[Targets]:
        version = self.snapshot().signed.meta["targets.json"].version
        return _load(self.layout.metadata / f"{version}.targets.json", Targets)

    def target(self, path: str) -> TargetFile | None:
        return self.targets().signed.targets.get(path)

    def read_target(self, path: str) -> bytes | None:
        """The bytes of target ``path``, checked against targets metadata; None if it is not a target."""
        try:
            return _read_target(self.layout, self.targets().signed, path)
        except KeyError:
            return None

    # changing it

    @contextmanager
    def edit_targets(self) -> Iterator[TargetsEditor]:
        """Edit targets under the lock; if anything was put, sign targets → snapshot → timestamp on exit."""
        with self.layout.locked():
            targets = self.targets()
            editor = TargetsEditor(self.layout, targets.signed)
            yield editor
            if editor.changed:
                targets.signed.version += 1
                _sign_and_write(self.layout, self.root().signed, targets, self.layout.read_expiry(), _now())

    def refresh(self, timestamp_expires: timedelta | None = None) -> Refreshed:
        """Re-sign timestamp (for cron); targets and snapshot too when less than half their validity is left.

        ``timestamp_expires`` defaults to the repository's setting; tests pass a negative one to make an
        expired timestamp.
        """
        with self.layout.locked():
            expiry = self.layout.read_expiry()
            now = _now()
            root = self.root().signed
            targets = self.targets()
            snapshot = self.snapshot().signed
            stale = (targets.signed.expires - now < expiry.of("targets") / 2
                     or snapshot.expires - now < expiry.of("snapshot") / 2)
            if stale:
                targets.signed.version += 1
                _sign_and_write(self.layout, root, targets, expiry, now, timestamp_expires)
            else:
                _write_timestamp(self.layout, root, self.timestamp().signed.snapshot_meta, expiry, now,
                                 timestamp_expires)
            ts = self.timestamp().signed
            return Refreshed(ts.version, ts.expires, stale, root.expires)


def _load(path: Path, role: type[T]) -> Metadata[T]:
    try:
        md: Metadata[T] = Metadata.from_file(str(path))
    except (OSError, DeserializationError) as e:
        raise RepoError(f"{path}: cannot read metadata ({e}); the repository is damaged, restore it from a backup") from e
    if not isinstance(md.signed, role):
        raise RepoError(f"{path} holds {md.signed.type} metadata, not {role.type}")
    return md


def _sign_and_write(layout: Layout, root: Root, targets: Metadata[Targets], expiry: Expiry, now: datetime,
                    timestamp_expires: timedelta | None = None) -> None:
    """Sign targets → snapshot → timestamp and write them, timestamp last: the one way metadata changes.

    ``targets`` carries its new version already; snapshot and timestamp each take the next version.
    """
    targets.signed.expires = now + expiry.of("targets")
    targets.sign(keys.online_signer(layout, Targets.type, root))
    raw_targets = targets.to_bytes(_SERIALIZER)
    write_atomically(layout.metadata / f"{targets.signed.version}.targets.json", raw_targets)

    previous = layout.metadata / "timestamp.json"
    snapshot_version = _load(previous, Timestamp).signed.snapshot_meta.version + 1 if previous.exists() else 1
    snapshot = Metadata(Snapshot(version=snapshot_version, expires=now + expiry.of("snapshot"),
                                 meta={"targets.json": _meta_file(targets.signed.version, raw_targets)}))
    snapshot.sign(keys.online_signer(layout, Snapshot.type, root))
    raw_snapshot = snapshot.to_bytes(_SERIALIZER)
    write_atomically(layout.metadata / f"{snapshot_version}.snapshot.json", raw_snapshot)

    _write_timestamp(layout, root, _meta_file(snapshot_version, raw_snapshot), expiry, now, timestamp_expires)


def _write_timestamp(layout: Layout, root: Root, snapshot_meta: MetaFile, expiry: Expiry, now: datetime,
                     expires: timedelta | None = None) -> None:
    path = layout.metadata / "timestamp.json"
    version = _load(path, Timestamp).signed.version + 1 if path.exists() else 1
    valid_for = expiry.of("timestamp") if expires is None else expires
    timestamp = Metadata(Timestamp(version=version, expires=now + valid_for, snapshot_meta=snapshot_meta))
    timestamp.sign(keys.online_signer(layout, Timestamp.type, root))
    write_atomically(path, timestamp.to_bytes(_SERIALIZER))
