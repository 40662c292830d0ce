"""Keeps the appliance at the desired state the AppStore signs for it, and reports back.

One pass (:meth:`Sync.run_once`, blocking: the daemon runs it on a thread, on a timer and on the MQTT
nudge ``{"cmd": "sync"}``):

1. refresh the TUF metadata (``appstore_client``): nothing below happens unless it verifies;
2. desired state = the channel's apps (or its rollout's, for an appliance in the rollout) plus the apps the
   site subscribed to (their newest version), see :func:`desired_apps`;
3. for each app not at its desired version: download the app and, if missing, its model (verified),
   install them with the same checks and admission as ``appliance apps add``, and wait until the new
   version serves; one that does not serve in ``activation_timeout_s`` is rolled back and refused, with
   the reason, and not tried again until the desired version changes;
4. the appliance's own release: the upgrade agent (:mod:`appliance.upgrade.agent`) takes one step towards
   the channel's ``appliance`` version (download, install, self-test, switch), see docs/upgrade.md;
5. report to the AppStore: versions, health, last error, the upgrade's state.

If the AppStore cannot be reached the appliance keeps serving what it has and tries again with backoff.
Every refusal (a tampered target, replayed or expired metadata, an untrusted key, an app that does not
fit) leaves the installed apps as they are and is shown with its reason in status and the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__, packages
from appliance.appstore_link import AppStoreLink
from appliance.auth.accounts import Actor
from appliance.errors import ConfigError, InstallError
from appliance.runtime.partitions import PartitionPlan
from appliance.settings import Settings
from appliance.status import AppStatus, CatalogApp, Download, SyncStatus, UpgradeStatus
from appliance.status import SyncState as SyncStateName
from appliance.store import Store
from appliance.tasks import in_daemon_thread
from appliance.upgrade.agent import Upgrader
from appliance_launcher.state import Layout
from appstore_client.client import AppStore, Catalog
from appstore_client.errors import CatalogError, FleetError
from appstore_client.fetcher import ResumableFetcher
from common.backoff import Backoff
from formats.app_manifest import AppManifest
from formats.channel import ChannelDoc, in_rollout
from formats.errors import FormatError

log = logging.getLogger(__name__)

ACTOR = "appstore-sync"
SYNC = Actor(ACTOR, "appstore")  # in the audit log: installs, rollbacks and refusals of the sync


@dataclass(slots=True)
class SyncState:
    """What the console and ``appliance status`` show about the AppStore link."""

    state: SyncStateName = "off"
    url: str = ""
    channel: str = ""
    group: str = ""
    rollout: str | None = None  # the rollout this appliance takes part in
    catalog_version: int | None = None
    last_sync: float | None = None  # the last pass that verified and reconciled everything
    last_attempt: float | None = None
    last_error: str = ""
    next_try_s: float | None = None
    desired: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # app -> why its desired version is not running
    catalog: tuple[CatalogApp, ...] = ()  # the published apps, for the console


def desired_apps(channel: ChannelDoc, device_id: str, group: str, subscriptions: list[str],
                 catalog: Catalog) -> tuple[dict[str, str], str | None]:
    """App -> version this appliance should run, and the id of the rollout it is in (or None)."""
    apps = channel.apps_for(device_id, group)
    r = channel.rollout
    rollout_id = r.id if r is not None and not r.halted and in_rollout(r, device_id, group) else None
    for name in subscriptions:
        latest = catalog.latest(name)
        if name not in apps and latest is not None:
            apps[name] = latest.version
    return apps, rollout_id


class Sync:
    def __init__(self, settings: Settings, store: Store, plans: list[PartitionPlan],
                 app_states: Callable[[], dict[str, AppStatus]], health: Callable[[], tuple[bool, str]],
                 link: AppStoreLink, layout: Layout | None = None, restart: Callable[[], None] = lambda: None,
                 config_file: Path | None = None) -> None:
        a = settings.appstore
        self._settings = settings
        self._store = store
        self._plans = plans
        self._app_states = app_states  # name -> the daemon's runtime state of the app (thread-safe)
        self._health = health
        self._dir = settings.state_dir / "appstore"
        self.fetcher = ResumableFetcher(self._dir / "partial", link.connection)
        self.fleet = link.fleet
        self.state = SyncState(state="starting", url=a.url or "", channel=a.channel, group=a.group)
        self._failed: dict[tuple[str, str], str] = {}  # (app, version) that did not activate -> why
        self._lock = threading.Lock()  # one pass at a time
        root = a.root.read_bytes() if a.root is not None else b""
        self._client = AppStore(a.url or "", root, self._dir, self.fetcher)
        self.reached: float | None = None  # when a refresh last verified the AppStore's metadata
        self.upgrader = Upgrader(settings, store, self._client, self.fetcher, layout, restart, app_states, config_file,
                                 appstore_reached=lambda: self.reached is not None)

    def upgrade_status(self) -> UpgradeStatus:
        return self.upgrader.status()

    def status(self) -> SyncStatus:
        s = self.state
        downloads = tuple(Download(url=p.url.rsplit("/", 1)[-1], received=p.received, total=p.total)
                          for p in list(self.fetcher.progress.values()))
        return SyncStatus(state=s.state, url=s.url, channel=s.channel, group=s.group, rollout=s.rollout,
                          catalog_version=s.catalog_version, last_sync=s.last_sync, last_attempt=s.last_attempt,
                          last_error=s.last_error, next_try_s=s.next_try_s, desired=dict(s.desired),
                          refused=dict(s.refused), catalog=s.catalog, downloads=downloads)

    # one pass

    def run_once(self) -> bool:
        """One refresh-reconcile-report pass; True when everything verified and the appliance is in sync."""
        with self._lock:
            self.state.last_attempt = time.time()
            self.state.state = "syncing"
            try:
                ok = self._pass()
            except CatalogError as e:
                self.state.state = "offline" if e.reason == "offline" else "refused"
                self.state.last_error = str(e)
                log.warning("AppStore sync: %s", e)
                ok = False
            self._report()
            return ok

    def _pass(self) -> bool:
        a = self._settings.appstore
        catalog = self._client.refresh()
        self.reached = time.time()
        channel = self._client.channel(a.channel)
        want, rollout = desired_apps(channel, self._settings.device_id, a.group, self._store.subscriptions.all(),
                                     catalog)
        self.state.catalog_version, self.state.desired, self.state.rollout = catalog.version, want, rollout
        # a refused version is tried again once the desired version has moved on and come back
        self._failed = {k: v for k, v in self._failed.items() if want.get(k[0]) == k[1]}
        self.state.catalog = tuple(
            CatalogApp(name=name, versions=tuple(v.version for v in versions), latest=versions[-1].version,
                       description=versions[-1].description, model=versions[-1].model)
            for name, versions in sorted(catalog.apps().items()))
        refused: dict[str, str] = {}
        for name, version in sorted(want.items()):
            why = self._reconcile(name, version, catalog)
            if why:
                refused[name] = why
        self.state.refused = refused
        self.upgrader.reconcile(channel)
        errors = [f"{k}: {v}" for k, v in refused.items()]
        if self.upgrader.state == "refused":
            errors.append(f"appliance {self.upgrader.desired}: {self.upgrader.reason}")
        self.state.last_error = "; ".join(errors)
        self.state.state = "refused" if refused else "in sync"
        self.state.last_sync = time.time()
        return not refused

    def _reconcile(self, name: str, version: str, catalog: Catalog) -> str:
        """Bring one app to ``version``; '' when done, else why not."""
        current = self._store.apps.get(name)
        if current is not None and current.version == version:
            return ""
        if (name, version) in self._failed:
            return self._failed[(name, version)]
        entry = catalog.find("app", name, version)
        if entry is None:
            return f"version {version} is not published in the AppStore"
        staging = self._dir / "staging" / f"{name}-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            manifest_path = self._client.download(entry.path, staging / "app.json")
            manifest = AppManifest.load(manifest_path)
            model_name, model_version = manifest.model.name, manifest.model.version
            if self._store.models.get(model_name, model_version) is None:
                folder = staging / "model"
                for f in ("model.json", "model.onnx"):
                    self._client.download(f"models/{model_name}/{model_version}/{f}", folder / f)
                packages.install_model(self._store, self._settings.models_dir, folder, by=SYNC)
            previous = current.version if current is not None else None
            packages.install_app(self._store, manifest_path, plans=self._plans, pins=self._settings.placement.pins,
                                 by=SYNC)
            log.info("AppStore: installed %s %s (was %s); waiting for it to serve", name, version, previous or "none")
        except CatalogError as e:
            if e.reason == "offline":
                raise
            return self._refuse(name, version, str(e), retry=e.reason == "not_published")
        except (InstallError, FormatError) as e:
            return self._refuse(name, version, f"refused at install: {e}", retry=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._await_activation(name, version, previous)

    def _await_activation(self, name: str, version: str, previous: str | None) -> str:
        timeout = self._settings.appstore.activation_timeout_s
        deadline = time.monotonic() + timeout
        state: AppStatus | None = None
        while time.monotonic() < deadline:
            state = self._app_states().get(name)
            if state is not None and state.state == "serving" and state.version == version:
                log.info("AppStore: %s %s is serving", name, version)
                return ""
            time.sleep(0.25)
        why = (f"{version} did not serve within {timeout:g} s (state {state.state if state else 'unknown'}"
               f"{': ' + state.reason if state and state.reason else ''})")
        if previous is not None:
            try:
                packages.rollback_app(self._store, name, ACTOR, "appstore")
                why += f"; rolled back to {previous}"
            except InstallError as e:
                why += f"; rollback failed: {e}"
        return self._refuse(name, version, why, retry=False)

    def _refuse(self, name: str, version: str, why: str, retry: bool) -> str:
        log.error("AppStore: %s %s refused: %s", name, version, why)
        if not retry:
            self._failed[(name, version)] = why
            self._store.audit_log.add(ACTOR, "app.refused", {"app": name, "version": version, "reason": why},
                                      "appstore")
        return why

    # reporting

    def _report(self) -> None:
        a = self._settings.appstore
        if not a.url or not a.device_token:
            return
        ok, reason = self._health()
        apps: dict[str, dict[str, Any]] = {n: {"version": s.version, "state": s.state}
                                           for n, s in self._app_states().items()}
        for name, why in self.state.refused.items():
            # the desired version failed here: say so under that version, so that a staged rollout whose
            # canaries refuse it is halted by the AppStore (the app itself still serves its old version)
            apps[name] = {"version": self.state.desired.get(name), "state": "refused", "reason": why,
                          "running": apps.get(name, {}).get("version")}
        body = {"device": self._settings.device_id, "channel": a.channel, "group": a.group,
                "rollout": self.state.rollout, "version": __version__, "apps": apps,
                "health": {"ok": ok, "reason": reason}, "last_sync": self.state.last_sync,
                "last_error": self.state.last_error, "upgrade": self.upgrader.report().model_dump()}
        if self.fleet is None:
            return  # no device token: the AppStore would refuse the report
        try:
            self.fleet.report(body)
        except FleetError as e:
            log.warning("status report not delivered: %s", e)


def make_sync(settings: Settings, store: Store, plans: list[PartitionPlan],
              app_states: Callable[[], dict[str, AppStatus]],
              health: Callable[[], tuple[bool, str]], link: AppStoreLink | None, layout: Layout | None = None,
              restart: Callable[[], None] = lambda: None, config_file: Path | None = None) -> Sync | None:
    """The sync loop's worker, or None when no AppStore is set."""
    if link is None:
        return None
    root: Path | None = settings.appstore.root
    if root is None or not root.is_file():
        raise ConfigError(f"appstore.root {root} is not a file: give the trusted root.json from the AppStore")
    return Sync(settings, store, plans, app_states, health, link, layout, restart, config_file)


class SyncLoop:
    """Runs :class:`Sync` passes on the daemon's loop: at start, every ``refresh_s``, at once when nudged,
    and with backoff (with jitter, up to ``retry_max_s``) while the AppStore cannot be reached. A pass runs
    on a thread of its own (downloads and the wait for activation block), marked daemon so that stopping
    the appliance never waits for a download."""

    def __init__(self, sync: Sync, settings: Settings) -> None:
        self.sync = sync
        self._settings = settings.appstore
        self._nudge = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def nudge(self) -> None:
        """Sync now (safe from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._nudge.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        failures = 0
        while True:
            await in_daemon_thread(self.sync.run_once, "appstore-sync")
            if self.sync.state.state == "offline":
                failures += 1
                delay = Backoff(base_s=2.0, max_s=self._settings.retry_max_s).delay(failures)
            else:
                failures = 0
                delay = self._settings.refresh_s
            self.sync.state.next_try_s = round(delay, 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), delay)
            self._nudge.clear()
