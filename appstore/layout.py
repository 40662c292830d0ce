"""Where things live in an AppStore folder, and how files in it are written.

::

    DIR/metadata/   served: 1.root.json, N.targets.json, N.snapshot.json, timestamp.json
    DIR/targets/    served: hash-prefixed target files (consistent snapshots)
    DIR/keys/       never served: private keys (0600); root keys belong offline
    DIR/appstore.json   settings: how long each role's metadata stays valid
    DIR/fleet.db    never served: device tokens, last reports, rollouts, the index of samples
    DIR/samples/    never served: hard samples the devices sent, {device}/{sample_id}.json (+ .jpg)
    DIR/.lock       held while the metadata is being re-signed, by the CLI or the server
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

from appstore.errors import RepoError
from common.files import write_atomically

SETTINGS_FILE = "appstore.json"


@dataclass(frozen=True, slots=True)
class Expiry:
    """How long newly signed metadata stays valid. Timestamp is short-lived so that a frozen mirror is noticed."""

    root_days: float = 365.0
    targets_days: float = 30.0
    snapshot_days: float = 30.0
    timestamp_hours: float = 24.0

    def of(self, role: str) -> timedelta:
        return {
            "root": timedelta(days=self.root_days),
            "targets": timedelta(days=self.targets_days),
            "snapshot": timedelta(days=self.snapshot_days),
            "timestamp": timedelta(hours=self.timestamp_hours),
        }[role]


@dataclass(frozen=True, slots=True)
class Layout:
    folder: Path

    @property
    def metadata(self) -> Path:
        return self.folder / "metadata"

    @property
    def targets(self) -> Path:
        return self.folder / "targets"

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    @property
    def settings(self) -> Path:
        return self.folder / SETTINGS_FILE

    @property
    def fleet_db(self) -> Path:
        return self.folder / "fleet.db"

    @property
    def samples(self) -> Path:
        return self.folder / "samples"

    def target_file(self, path: str, sha256: str) -> Path:
        """The stored file of target ``path``: its name prefixed with its sha256, as TUF clients ask for it."""
        parent, _, name = path.rpartition("/")
        return self.targets / parent / f"{sha256}.{name}"

    def exists(self) -> bool:
        return (self.metadata / "1.root.json").is_file()

    def require(self) -> None:
        if not self.exists():
            raise RepoError(f"{self.folder} is not an AppStore repository (no metadata/1.root.json); "
                            f"create one with: appstore --repo {self.folder} keys init")

    def read_expiry(self) -> Expiry:
        try:
            raw = json.loads(self.settings.read_text())["expires"]
            return Expiry(**{f.name: float(raw[f.name]) for f in fields(Expiry) if f.name in raw})
        except FileNotFoundError:
            return Expiry()
        except (ValueError, KeyError, TypeError) as e:
            raise RepoError(f"{self.settings}: unreadable ({e}); fix it or delete it to use the defaults") from e

    def write_expiry(self, expiry: Expiry) -> None:
        write_atomically(self.settings, (json.dumps({"expires": asdict(expiry)}, indent=2) + "\n").encode())

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the repository's write lock: one writer re-signs at a time, across processes."""
        with open(self.folder / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


