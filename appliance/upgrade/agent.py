"""The upgrade agent: brings the appliance's own release to the version its channel names (docs/upgrade.md).

It runs inside the AppStore sync pass (one refresh, one verified catalog, one report), after the apps:

1. the desired version is the channel's ``appliance`` (or its rollout's, for a device in it); nothing to
   do when it runs already; a downgrade is refused unless the channel says ``allow_downgrade``;
2. the manifest ``appliance/{version}/release.json`` and every wheel the box lacks are downloaded through
   TUF (verified, resumable) into the wheel store; each wheel is checked against the manifest too;
3. the release is installed offline into ``releases/{version}`` and self-tested with its own Python
   (imports, settings, migrations on a copy of the database, a model load);
4. inside the maintenance window (and not postponed by an admin) the database is snapshotted with SQLite's
   backup API, the request is written for the launcher, and the daemon stops with ``RESTART_EXIT``; the
   launcher switches ``current`` and starts the new release, which must confirm its own health.

A version that fails any step is ``refused`` with the reason, reported like an app's refusal (so the
AppStore halts a rollout its canaries cannot take) and not tried again until the desired version changes.
A version the launcher took back is refused the same way when the old release starts again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance import __version__
from appliance.auth.accounts import Actor
from appliance.settings import Settings
from appliance.status import AppStatus, UpgradeHistory, UpgradeState, UpgradeStatus
from appliance.store import Store
from appliance.upgrade.errors import SelfTestFailed, UpgradeError
from appliance.upgrade.install import base_python, check_box, has_wheel, install_release, prune, wheel_path
from appliance_launcher.state import Layout, Request, StateError, Trial
from appstore_client.client import AppStore, version_key
from appstore_client.errors import CatalogError
from appstore_client.fetcher import ResumableFetcher
from common import crashpoint
from common.files import fsync_dir, write_atomically
from formats.channel import ChannelDoc, UpgradeReport
from formats.errors import FormatError
from formats.release import ReleaseManifest, matches, release_manifest_target

log = logging.getLogger(__name__)

ACTOR = Actor("appliance-upgrade", "appstore")
SELFTEST_TIMEOUT_S = 300.0  # seconds the new release gets for its self-test


def in_window(window: str, now: datetime) -> bool:
    """Whether local time ``now`` is inside ``"HH:MM-HH:MM"`` (which may cross midnight); "" is always."""
    if not window:
        return True
    start, end = window.split("-")
    minutes = now.hour * 60 + now.minute
    a, b = (int(start[:2]) * 60 + int(start[3:]), int(end[:2]) * 60 + int(end[3:]))
    return a <= minutes < b if a <= b else minutes >= a or minutes < b


@dataclass(slots=True)
class _Refusals:
    """``upgrade/refused.json``: versions refused here and why, kept across restarts (a refused version is
    not tried again until the desired version changes), and the last launcher history entry seen."""

    path: Path | None
    versions: dict[str, str]
    seen: float = 0.0

    @classmethod
    def load(cls, path: Path | None) -> _Refusals:
        if path is None or not path.is_file():
            return cls(path, {})
        try:
            data = json.loads(path.read_bytes())
            return cls(path, {str(k): str(v) for k, v in data.get("versions", {}).items()}, float(data.get("seen", 0)))
        except (OSError, ValueError, AttributeError):
            log.warning("%s is unreadable; starting with no refused versions", path)
            return cls(path, {})

    def save(self) -> None:
        if self.path is not None:
            write_atomically(self.path, json.dumps({"versions": self.versions, "seen": self.seen}).encode())


class Upgrader:
    def __init__(self, settings: Settings, store: Store, client: AppStore, fetcher: ResumableFetcher,
                 layout: Layout | None, restart: Callable[[], None], app_states: Callable[[], dict[str, AppStatus]],
                 config_file: Path | None = None, appstore_reached: Callable[[], bool] = lambda: False) -> None:
        self._settings = settings
        self._store = store
        self._client = client
        self._fetcher = fetcher
        self.layout = layout
        self._restart = restart
        self._app_states = app_states
        self._config_file = config_file
        self._appstore_reached = appstore_reached
        self._lock = threading.Lock()
        self._refused = _Refusals.load(layout.upgrade / "refused.json" if layout else None)
        self.state: UpgradeState = "idle"
        self.reason = ""
        self.desired: str | None = None
        self.trial: Trial | None = None  # this release, on trial and not yet confirmed
        self.previous: str | None = layout.target(layout.previous) if layout else None
        self.postponed_until: float | None = None
        self.force = False  # an admin's "apply now": the next switch ignores the window once
        self._received = 0
        self._total = 0
        self._read_launcher()

    # what the launcher says

    def _read_launcher(self) -> None:
        if self.layout is None:
            return
        try:
            state = self.layout.state()
        except StateError as e:
            log.error("upgrades are off: %s", e)
            self.layout = None
            return
        if state.trial is not None and state.trial.version == __version__:
            self.trial = state.trial
            self.state, self.previous = "confirming", state.trial.from_version
        last = state.history[-1] if state.history else None
        if last is not None and last.ts > self._refused.seen:
            self._refused.seen = last.ts
            if last.outcome == "rolled back":
                why = f"rolled back by the launcher: {last.reason}"
                self._refused.versions[last.to_version] = why
                self.state, self.reason, self.desired = "rolled back", why, last.to_version
                self._store.audit_log.add(ACTOR.name, "upgrade.rolled_back",
                                          {"version": last.to_version, "back_on": __version__, "reason": last.reason},
                                          ACTOR.address)
                log.error("appliance %s was rolled back: %s", last.to_version, last.reason)
            elif last.outcome == "rollback":  # an admin's: the version left stays off until the channel moves on
                why = f"rolled back by an admin ({last.reason})"
                self._refused.versions[last.from_version] = why
                self.state, self.reason, self.desired = "rolled back", why, last.from_version
            elif last.outcome == "confirmed" and last.to_version == __version__:
                self.state = "upgraded"
            self._refused.save()

    def confirmed(self) -> None:
        """This release, on trial, has confirmed its health (written by the health check)."""
        trial = self.trial
        self.trial = None
        self.state, self.reason = "upgraded", ""
        if trial is not None:
            self._store.audit_log.add(ACTOR.name, "upgrade.confirmed",
                                      {"version": __version__, "from": trial.from_version, "starts": trial.tries},
                                      ACTOR.address)

    def status(self) -> UpgradeStatus:
        history: tuple[UpgradeHistory, ...] = ()
        if self.layout is not None:
            try:
                history = tuple(UpgradeHistory(ts=h.ts, from_version=h.from_version, to_version=h.to_version,
                                               outcome=h.outcome, reason=h.reason)
                                for h in reversed(self.layout.state().history))
            except StateError:
                pass
        return UpgradeStatus(running=__version__, previous=self.previous, desired=self.desired, state=self.state,
                             reason=self.reason, received=self._received, total=self._total,
                             launcher=self.layout is not None, window=self._settings.upgrade.window,
                             postponed_until=self.postponed_until, history=history)

    def report(self) -> UpgradeReport:
        return UpgradeReport(running=__version__, desired=self.desired, state=self.state, reason=self.reason,
                             previous=self.previous)

    # admins

    def postpone(self, until: float, by: Actor) -> None:
        self.postponed_until = until
        self._store.audit_log.add(by.name, "upgrade.postpone", {"until": until, "desired": self.desired}, by.address)

    def apply_now(self, by: Actor) -> None:
        self.force, self.postponed_until = True, None
        self._store.audit_log.add(by.name, "upgrade.apply", {"desired": self.desired}, by.address)

    def rollback(self, by: Actor) -> str:
        """Back to ``previous`` on an admin's word: the launcher switches at this release's exit."""
        layout = self.layout
        if layout is None:
            raise UpgradeError("this appliance was not started by appliance-launcher: there is no release to go back "
                               "to")
        previous = layout.target(layout.previous)
        if previous is None or not layout.installed(previous) or previous == __version__:
            raise UpgradeError("there is no previous release on this box to go back to")
        snapshot = layout.upgrade / f"snapshot-{previous}.db"
        restore = snapshot.is_file() and self._schema_of(previous) < self._schema_of(__version__)
        layout.write_request(Request(version=previous, from_version=__version__, db=str(self._settings.db_path),
                                     snapshot=str(snapshot) if restore else None,
                                     snapshot_time=snapshot.stat().st_mtime if restore else 0.0, rollback=True,
                                     reason=f"asked by {by.name}"))
        self._store.audit_log.add(by.name, "upgrade.rollback", {"from": __version__, "to": previous,
                                                                "database_restored": restore}, by.address)
        self._restart()
        return previous

    def _schema_of(self, version: str) -> int:
        from appliance.store.migrations import SCHEMA_VERSION
        from appliance.upgrade.install import release_manifest

        if version == __version__:
            return SCHEMA_VERSION
        m = release_manifest(self.layout, version) if self.layout else None
        return m.db_schema if m else 0

    # the pass

    def reconcile(self, channel: ChannelDoc) -> None:
        """One step towards the channel's appliance release (called by the sync pass, on its thread)."""
        with self._lock:
            a = self._settings.appstore
            desired = channel.appliance_for(self._settings.device_id, a.group)
            if desired != self.desired:
                self.force = False
            self.desired = desired
            kept = {v: r for v, r in self._refused.versions.items() if v == desired}
            if kept != self._refused.versions:  # the desired version moved on: what was refused may be tried again
                self._refused.versions = kept
                self._refused.save()
            if self.trial is not None:
                return  # confirming: nothing else until this release has proven itself
            if desired is None or desired == __version__:
                if self.state not in ("upgraded", "rolled back") or desired == __version__:
                    self.state, self.reason = ("upgraded" if self.previous and desired else "idle"), ""
                return
            if desired in self._refused.versions:
                self.state = "rolled back" if self.state == "rolled back" else "refused"
                self.reason = self._refused.versions[desired]
                return
            try:
                self._towards(desired, channel)
            except CatalogError as e:
                if e.reason == "offline":
                    self.state, self.reason = "waiting", str(e)
                    raise
                self._refuse(desired, str(e), keep=e.reason != "not_published")
            except UpgradeError as e:
                self._refuse(desired, str(e), keep=not e.retry)
            except Exception as e:  # a bug here must not stop the sync: refuse, keep serving
                log.exception("upgrade to %s failed unexpectedly", desired)
                self._refuse(desired, f"unexpected error: {type(e).__name__}: {e}", keep=False)

    def _refuse(self, version: str, why: str, keep: bool) -> None:
        log.error("appliance %s refused: %s", version, why)
        self.state, self.reason = "refused", why
        self._received = self._total = 0
        if keep:
            self._refused.versions[version] = why
            self._refused.save()
            self._store.audit_log.add(ACTOR.name, "upgrade.refused", {"version": version, "reason": why},
                                      ACTOR.address)

    def _towards(self, desired: str, channel: ChannelDoc) -> None:
        layout = self.layout
        if layout is None:
            raise UpgradeError(f"appliance {desired} is wanted, but this appliance was not started by "
                               "appliance-launcher, which upgrades need; run it under the launcher (docs/upgrade.md)",
                               retry=True)
        if version_key(desired) < version_key(__version__) and not channel.allow_downgrade:
            raise UpgradeError(f"{desired} is older than {__version__}, which runs here; a downgrade needs the "
                               f"channel to allow it (appstore channel set {channel.channel} --appliance {desired} "
                               "--allow-downgrade)")
        manifest = self._manifest(desired)
        if version_key(__version__) < version_key(manifest.min_from):
            raise UpgradeError(f"{desired} upgrades from {manifest.min_from} or newer; this box runs {__version__}: "
                               f"put the channel on a release in between first")
        python = self._settings.upgrade.python or base_python()
        check_box(manifest, python)
        if not layout.installed(desired):
            self._download(layout, manifest)
            self.state = "installing"
            self._audit("upgrade.install", desired)
            install_release(layout, manifest, python, self._cache_dir(layout))
        tested = layout.release(desired) / ".tested"
        if not tested.is_file():  # tested once per install: a kill during the test means testing again
            self.state = "testing"
            self._self_test(layout, desired)
            write_atomically(tested, b"")
        if self.postponed_until is not None and time.time() < self.postponed_until:
            self.state, self.reason = "postponed", f"postponed by an admin until {_local(self.postponed_until)}"
            return
        if not self.force and not in_window(self._settings.upgrade.window, datetime.now()):
            self.state, self.reason = "waiting", f"installed; switches in the window {self._settings.upgrade.window}"
            return
        self._switch(layout, desired)

    def _cache_dir(self, layout: Layout) -> Path:
        return self._settings.upgrade.cache_dir or layout.root / "cache" / "uv"

    def _manifest(self, version: str) -> ReleaseManifest:
        target = release_manifest_target(version)
        dest = self._settings.state_dir / "appstore" / "staging" / f"release-{version}.json"
        try:
            path = self._client.download(target, dest)
        except CatalogError as e:
            if e.reason == "not_published":
                raise CatalogError("not_published", f"appliance {version} is not published in the AppStore "
                                   "(appstore publish release)") from e
            raise
        try:
            manifest = ReleaseManifest.parse(path.read_bytes(), target)
        except FormatError as e:
            raise UpgradeError(f"the release manifest was published wrong: {e}") from e
        if manifest.version != version:
            raise UpgradeError(f"{target} describes version {manifest.version}, not {version}")
        return manifest

    def _download(self, layout: Layout, manifest: ReleaseManifest) -> None:
        lacking = [f for f in manifest.files if not has_wheel(layout, f)]
        self.state, self.reason = "downloading", ""
        self._total, self._received = sum(f.length for f in lacking), 0
        self._audit("upgrade.download", manifest.version, files=len(lacking), bytes=self._total)
        log.info("appliance %s: downloading %d of %d files (%d bytes; the rest is on the box)", manifest.version,
                 len(lacking), len(manifest.files), self._total)
        for f in lacking:
            dest = wheel_path(layout, f)
            tmp = dest.with_name(f".{f.name}.part")
            self._client.download(f.target, tmp)
            if not matches(tmp, f):
                tmp.unlink(missing_ok=True)
                raise UpgradeError(f"{f.name} does not match the release manifest (length or sha256)")
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            self._received += f.length

    def _self_test(self, layout: Layout, version: str) -> None:
        folder = self._settings.state_dir / "appstore" / "staging"
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / f"selftest-{version}.db"
        snapshot_db(self._settings.db_path, copy)
        served = {(a.model_name, a.model_version) for a in self._store.apps.all() if a.enabled}
        models = [m.path for m in self._store.models.all() if (m.name, m.version) in served]
        args = [str(layout.release(version) / "bin" / "python"), "-m", "appliance.upgrade.selftest", "--db", str(copy)]
        if self._config_file is not None:
            args += ["--config", str(self._config_file)]
        for m in models:
            args += ["--model", m]
        crashpoint.reached("upgrade.selftest")  # the crash tests: killed with the copy of the database made
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=SELFTEST_TIMEOUT_S, check=False,
                               cwd=self._settings.state_dir)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SelfTestFailed(f"self-test of {version} did not finish: {e}") from e
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
        lines = r.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else {}
        except ValueError:
            result = {}
        if r.returncode != 0 or not result.get("ok"):
            problems = result.get("problems") or [(r.stderr or r.stdout).strip()[-500:] or f"exit {r.returncode}"]
            shutil.rmtree(layout.release(version), ignore_errors=True)  # made again if the version is retried
            raise SelfTestFailed(f"self-test of {version} failed: {'; '.join(str(p) for p in problems)[:1000]}")
        log.info("appliance %s passed its self-test (schema %s)", version, result.get("schema"))

    def _switch(self, layout: Layout, version: str) -> None:
        self.state, self.reason = "switching", ""
        snapshot = layout.upgrade / f"snapshot-{__version__}.db"
        taken = snapshot_db(self._settings.db_path, snapshot)
        crashpoint.reached("upgrade.snapshot")
        serving = sorted(n for n, s in self._app_states().items() if s.state == "serving")
        layout.write_request(Request(version=version, from_version=__version__, db=str(self._settings.db_path),
                                     snapshot=str(snapshot), snapshot_time=taken,
                                     appstore_reachable=self._appstore_reached(), serving_apps=serving))
        self._audit("upgrade.switch", version, snapshot=str(snapshot), serving=serving)
        crashpoint.reached("upgrade.switch")
        log.warning("switching to appliance %s: stopping %s for the launcher to start it", version, __version__)
        self._restart()

    def _audit(self, action: str, version: str, **detail: object) -> None:
        self._store.audit_log.add(ACTOR.name, action, {"version": version, "from": __version__, **detail},
                                  ACTOR.address)

    def after_confirmation(self) -> None:
        """Prune releases beyond ``keep_releases`` once this one is confirmed (current and previous stay)."""
        if self.layout is None:
            return
        keep = {v for v in (__version__, self.layout.target(self.layout.previous)) if v}
        removed = prune(self.layout, keep, self._settings.upgrade.keep_releases)
        if removed:
            log.info("removed old releases %s", ", ".join(removed))


def snapshot_db(db: Path, dest: Path) -> float:
    """A consistent copy of the live database (SQLite's backup API, while it is in use); returns its time."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    taken = time.time()
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return taken


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
