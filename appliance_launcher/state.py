"""The files the launcher and the releases share (docs/upgrade.md, "On the box"): one declaration, both sides.

Everything lives under the launcher's root (``/var/lib/appliance`` on a box)::

    releases/{version}/     a complete environment (bin/appliance) and its release.json; .installed when whole
    wheels/{sha256}/{name}  the wheels of the releases kept, so an upgrade downloads only what is new
    current -> releases/X   the release that runs; replaced by renaming a new link over it, never unlinked
    previous -> releases/W  what a failed upgrade goes back to
    launcher.json           the launcher's state: the release on trial and its boot counter, the history
    upgrade/request.json    written by the running release before it exits with RESTART_EXIT: switch to this
    upgrade/confirm.json    written by a release on trial once it is healthy, naming the boot it was given
    upgrade/snapshot-*.db   the database as it was before the switch (SQLite backup API)

Standard library only (with the project's stdlib-only ``common``): the launcher imports it, and so does
the appliance's upgrade agent, whichever release it is. Every file is JSON, written atomically; a file
from a newer protocol is refused, never half understood.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from common.files import fsync_dir, write_atomically

PROTOCOL = 1
RESTART_EXIT = 75  # a release exits with this to ask the launcher to start ``current`` again (after a request)
ROOT_ENV = "LAUNCHER_ROOT"  # set by the launcher in the release's environment: where this tree is
BOOT_ENV = "LAUNCHER_BOOT_ID"  # a fresh id per start; a confirmation must name it
HISTORY_KEPT = 50
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")  # formats.model_card.VERSION_PATTERN, stdlib side

T = TypeVar("T")


class StateError(Exception):
    """A shared file is unreadable or from a newer protocol; the message names it."""


@dataclass(slots=True)
class Request:
    """``upgrade/request.json``: what the running release asks the launcher to do when it exits."""

    version: str  # the release to start next
    from_version: str  # the release asking
    db: str  # the live database file
    snapshot: str | None  # the database as it was before (None: nothing to restore on a rollback)
    snapshot_time: float = 0.0  # epoch seconds; rows written after it are carried over on a rollback
    rollback: bool = False  # an admin's "back to previous": no trial, the snapshot restored if given
    appstore_reachable: bool = False  # the AppStore answered the release asking: the new one must reach it too
    serving_apps: list[str] = field(default_factory=list)  # apps that served before: they must serve again
    reason: str = ""


@dataclass(slots=True)
class Trial:
    """A release that has not yet confirmed its health: the boot counter and what a rollback needs."""

    version: str
    from_version: str
    previous_before: str | None  # ``previous`` before the switch, restored by a rollback
    db: str
    snapshot: str | None
    snapshot_time: float
    appstore_reachable: bool
    serving_apps: list[str]
    tries: int = 0  # starts so far
    last_failure: str = ""


@dataclass(slots=True)
class Carry:
    """After a rollback: the failed release's database, from which the restored release takes the rows
    written after the snapshot (events, alert handling, audit lines) at its next start."""

    failed_db: str
    since: float
    version: str


@dataclass(slots=True)
class HistoryEntry:
    ts: float
    from_version: str
    to_version: str
    outcome: str  # "confirmed", "rolled back", "rollback" (an admin's), "refused" (written by the agent)
    reason: str = ""


@dataclass(slots=True)
class LauncherState:
    protocol: int = PROTOCOL
    trial: Trial | None = None
    carry: Carry | None = None
    history: list[HistoryEntry] = field(default_factory=list)

    def record(self, from_version: str, to_version: str, outcome: str, reason: str = "") -> None:
        self.history.append(HistoryEntry(time.time(), from_version, to_version, outcome, reason))
        del self.history[:-HISTORY_KEPT]


@dataclass(slots=True)
class Confirmation:
    version: str
    boot: str
    ts: float


def _build(cls: type[T], data: Any, where: Path) -> T:
    if not isinstance(data, dict):
        raise StateError(f"{where}: expected a JSON object")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise StateError(f"{where}: {e}") from e


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: cannot read ({e})") from e


def _write(path: Path, value: Any) -> None:
    write_atomically(path, (json.dumps(asdict(value), indent=2) + "\n").encode())


class Layout:
    """The launcher's root and the files in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.wheels = root / "wheels"
        self.upgrade = root / "upgrade"
        self.current = root / "current"
        self.previous = root / "previous"
        self.state_file = root / "launcher.json"
        self.request_file = self.upgrade / "request.json"
        self.confirm_file = self.upgrade / "confirm.json"
        self.child_file = root / "launcher.child"  # the pid of the release the launcher started

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Layout | None:
        """The layout of the launcher that started this process, or None when none did."""
        root = (os.environ if environ is None else environ).get(ROOT_ENV)
        return cls(Path(root)) if root else None

    def release(self, version: str) -> Path:
        if not _VERSION.match(version):  # a name from a shared file never leaves releases/
            raise StateError(f"{version!r} is not a release version (letters, digits and . + _ -)")
        return self.releases / version

    def installed(self, version: str) -> bool:
        try:
            return (self.release(version) / ".installed").is_file()
        except StateError:
            return False

    def installed_versions(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if not p.name.startswith(".") and self.installed(p.name))

    def target(self, link: Path) -> str | None:
        """The version a link points at, or None."""
        try:
            return Path(os.readlink(link)).name
        except OSError:
            return None

    def point(self, link: Path, version: str | None) -> None:
        """Make ``link`` point at ``releases/{version}`` atomically: a new link renamed over the old one."""
        if version is None:
            link.unlink(missing_ok=True)
            return
        self.release(version)  # refuses a name that would leave releases/
        tmp = link.with_name(f".{link.name}.new")
        tmp.unlink(missing_ok=True)
        os.symlink(Path("releases") / version, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    # the shared files

    def state(self) -> LauncherState:
        data = _read(self.state_file)
        if data is None:
            return LauncherState()
        protocol = data.get("protocol") if isinstance(data, dict) else None
        if protocol != PROTOCOL:
            raise StateError(f"{self.state_file}: protocol {protocol!r}, this program knows {PROTOCOL}; "
                             "install the launcher that came with the newest release")
        state = _build(LauncherState, data, self.state_file)
        state.trial = _build(Trial, data["trial"], self.state_file) if data.get("trial") else None
        state.carry = _build(Carry, data["carry"], self.state_file) if data.get("carry") else None
        state.history = [_build(HistoryEntry, h, self.state_file) for h in data.get("history") or []]
        return state

    def save(self, state: LauncherState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write(self.state_file, state)

    def request(self) -> Request | None:
        data = _read(self.request_file)
        return None if data is None else _build(Request, data, self.request_file)

    def write_request(self, request: Request) -> None:
        self.upgrade.mkdir(parents=True, exist_ok=True)
        _write(self.request_file, request)

    def confirmation(self) -> Confirmation | None:
        data = _read(self.confirm_file)
        return None if data is None else _build(Confirmation, data, self.confirm_file)

    def confirm(self, version: str, boot: str) -> None:
        self.upgrade.mkdir(parents=True, exist_ok=True)
        _write(self.confirm_file, Confirmation(version, boot, time.time()))
