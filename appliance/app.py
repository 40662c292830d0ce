"""Assembles the daemon's components, starts them in order and stops them in reverse.

Nothing here does the work itself: ingest, the worker supervisor, the pipeline, events and the HTTP
server each own one job; this module wires them and supervises their timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn

from appliance import __version__
from appliance.appstore_link import AppStoreLink, appstore_link
from appliance.auth import Accounts
from appliance.broker import EmbeddedBroker
from appliance.console.diagnostics import build_bundle
from appliance.console.install import install_console
from appliance.devices.broker import ManagedBroker
from appliance.devices.registry import Registry
from appliance.events import EventSink
from appliance.giveback import CHECK_S as GIVE_BACK_CHECK_S
from appliance.giveback import GiveBack
from appliance.http.context import Console
from appliance.http.listen import bind_http, check_tls, http_server
from appliance.http.live import LiveFeed
from appliance.http.security import is_loopback
from appliance.http.server import build_app
from appliance.ingest.client import MqttClient, ReceiveMessage
from appliance.ingest.ingest import Ingest
from appliance.logs import RECENT_LOGS
from appliance.metrics import Metrics, PartitionSample
from appliance.packages import clean_staging
from appliance.pipeline import Pipeline
from appliance.runtime.deploy import placement_for
from appliance.runtime.inventory import NvmlReader, PynvmlReader, RecordedReader, read_inventory
from appliance.runtime.messages import WorkerConfig
from appliance.runtime.monitor import UTILISATION_S, PartitionMonitor
from appliance.runtime.partitions import PartitionPlan, plan_partitions, session_providers
from appliance.runtime.supervisor import WorkerSupervisor
from appliance.samples.capture import SampleCapture
from appliance.samples.spool import Spool
from appliance.samples.uploader import Uploader
from appliance.settings import Settings, use_timezone
from appliance.stats import Stats
from appliance.status import AppStatus, DaemonStatus, Health, SampleQuota, SyncStatus, UpgradeStatus
from appliance.store import Store, StoreError
from appliance.sync import SyncLoop, make_sync
from appliance.tasks import threadsafe
from appliance.upgrade.carry import take_carry
from appliance.upgrade.confirm import HealthConfirmation
from appliance_launcher.state import BOOT_ENV, RESTART_EXIT, Layout, Trial
from common.sdnotify import notify, watchdog_interval_s

log = logging.getLogger(__name__)

CONFIG_POLL_S = 1.0  # how often the store is asked whether models or apps changed
SOURCES_FLUSH_S = 10.0  # how often source last-seen times are written to the store
DEVICES_FLUSH_S = 2.0  # how often what the managed broker saw of the devices is written (nothing seen: no write)
MODELS_LOAD_WAIT_S = 60.0  # at start, ingest waits this long at most for the models to load


class Daemon:
    def __init__(self, settings: Settings, config_file: Path | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.layout = Layout.from_env()  # the launcher's, when it started this release (upgrades need it)
        self.exit_code = 0
        self.stopped = asyncio.Event()  # set to stop the daemon (SIGTERM, or a switch to another release)
        self.confirmation: HealthConfirmation | None = None
        self._http_port = 0
        s = settings
        self.started = time.time()
        self.store: Store | None = None
        self.broker = EmbeddedBroker(s.broker.host, s.broker.port) if s.broker.mode == "embedded" else None
        self.managed = ManagedBroker(s) if s.broker.mode == "managed" else None
        i = s.ingest
        self.stats = Stats(i.source_silent_s, latest_frames_bytes=i.latest_frames_bytes,
                           forget_after_s=i.source_forget_s, unknown_kept=i.unknown_sources_kept)
        f = s.hardware.inventory_file
        self.nvml: NvmlReader = RecordedReader(f) if f else PynvmlReader()
        self.inventory = read_inventory(f)
        self.plans = plan_partitions(s.partitions, self.inventory, s.state_dir / "tensorrt-cache")
        self.workers = {p.name: WorkerSupervisor(self._worker_config(p), s.runtime,
                                                 on_change=functools.partial(self._worker_changed, p.name))
                        for p in self.plans}
        self.partitions = PartitionMonitor(self.plans, self.workers, self.nvml)
        self.give_back = GiveBack(self.stats.frame_bytes)  # forgotten cameras' frames go back to the system
        self.metrics = Metrics(self.stats, self._partition_metrics)
        self.placement: dict[str, str] = {}
        base = f"{s.topics.appliance}/{s.device_id}"
        self.status_topic, self.commands_topic = f"{base}/status", f"{base}/commands"
        self.results_topic = f"{base}/results"
        self.mqtt = MqttClient(self.managed.client_settings() if self.managed else s.broker,
                               client_id=self.managed.client_id if self.managed else f"appliance-{s.device_id}",
                               will=(self.status_topic, self._status_payload("offline")),
                               on_connection_change=self._on_connection)
        self.events: EventSink | None = None
        self.pipeline: Pipeline | None = None
        self.ingest: Ingest | None = None
        self._http: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = -1
        self.live = LiveFeed()  # new events for the console's open pages
        self.sync_loop: SyncLoop | None = None
        self.samples: SampleCapture | None = None
        self.uploader: Uploader | None = None
        self._quota = SampleQuota(bytes=s.samples.quota_bytes, count=s.samples.quota_count)
        self.appstore: AppStoreLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _worker_config(self, plan: PartitionPlan) -> WorkerConfig:
        providers = tuple((name, dict(options)) for name, options in session_providers(plan))
        runtime = self.settings.runtime
        executors = runtime.executors or plan.executors
        threads = runtime.intra_op_threads or plan.threads_for(executors)
        alone = len(plan.cores) if plan.kind == "cpu" and runtime.lone_frame_all_cores and executors > 1 else 0
        return WorkerConfig(partition=plan.name, providers=providers, env=dict(plan.env), cores=plan.cores,
                            intra_op_threads=threads, executors=executors, alone_threads=alone,
                            max_image_pixels=self.settings.ingest.max_image_pixels,
                            max_batch=runtime.max_batch or plan.max_batch,
                            max_batch_delay_s=runtime.max_batch_delay_ms / 1000)

    def _worker_changed(self, partition: str) -> None:
        if self.pipeline is not None:
            self.pipeline.on_worker_change(partition)

    def _partition_metrics(self) -> list[PartitionSample]:
        pipeline = self.pipeline
        return self.partitions.samples(pipeline.lane_load if pipeline else lambda _: (0, 0))

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "device": self.settings.device_id, "version": __version__,
                           "ts": time.time()}).encode()

    def _on_connection(self, up: bool) -> None:  # on the MQTT thread
        if up:
            self.mqtt.publish(self.status_topic, self._status_payload("online"), qos=1, retain=True)

    def _publish_result(self, result: dict[str, object]) -> None:
        self.mqtt.publish(self.results_topic, json.dumps(result).encode())

    def _on_command(self, msg: ReceiveMessage) -> None:  # on the MQTT thread
        try:
            cmd = json.loads(msg.payload).get("cmd")
        except (ValueError, AttributeError):
            cmd = None
        if cmd == "sync" and self.sync_loop is not None:
            self.sync_loop.nudge()
        elif cmd == "reload" and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._reload(force=True)))
        elif cmd == "status":
            self._on_connection(True)
        else:
            log.warning("ignored command on %s: %r (known: sync, reload, status)", msg.topic, msg.payload[:100])

    def request_restart(self) -> None:
        """Stop and exit with RESTART_EXIT, for the launcher to start ``current`` (safe from any thread)."""
        self.exit_code = RESTART_EXIT
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.stopped.set)

    # lifecycle

    async def start(self) -> None:
        s = self.settings
        self._loop = asyncio.get_running_loop()
        # systemd's watchdog (the image's appliance.service) is fed from this loop from the first moment,
        # so a long model load does not count as a hang, and a hung loop does
        interval = watchdog_interval_s()
        watchdog = self._every(interval, self._feed_watchdog, "watchdog") if interval else None
        s.state_dir.mkdir(parents=True, exist_ok=True)
        check_tls(s.http)
        if self.layout is not None and s.db_path.exists():
            await asyncio.to_thread(take_carry, self.layout, s.db_path)  # after a rollback: the failed release's rows
        self.store = Store(s.db_path)
        sock = bind_http(s.http)
        self._http_port = sock.getsockname()[1]
        if self.broker is not None:
            self.broker.start()
        if self.managed is not None:
            await asyncio.to_thread(self.managed.start, self.store)
        self.events = EventSink(self.store, s, lambda topic, payload: self.mqtt.publish(topic, payload, qos=1),
                                on_event=self.live.publish, side_work=self.metrics.side_work)
        spool = Spool(self.store, s.samples, s.state_dir / "samples", s.device_id)
        await asyncio.get_running_loop().run_in_executor(None, spool.tidy)
        await asyncio.get_running_loop().run_in_executor(None, clean_staging, s.models_dir)
        self.samples = SampleCapture(spool, self.store, s.state_dir, s.samples.apps)
        self.appstore = appstore_link(s)  # the one connection: sync, reports and samples
        self.uploader = Uploader(spool, self.store, s.samples, self.appstore.fleet if self.appstore else None)
        self.samples.on_captured.append(self.uploader.wake)
        self.pipeline = Pipeline(self.workers, self.events, self.stats, self.metrics, s.ingest.telemetry_queue,
                                 self._publish_result if s.outputs.results else None, self.samples.on_result)
        self.ingest = Ingest(self.mqtt, s, self.stats, self.pipeline.accepts, self.pipeline.offer)
        for worker in self.workers.values():
            await worker.start()
        await self.pipeline.start()
        await self._reload()
        await self._models_settled(MODELS_LOAD_WAIT_S)
        self.ingest.start()
        self.mqtt.subscribe(self.commands_topic, self._on_command)
        self.mqtt.start()
        h = s.http
        store = self.store
        console = Console(store, Accounts(store), s.snapshots_dir, self.status, secure_cookies=h.tls, stats=self.stats,
                          live=self.live, diagnostics=lambda: build_bundle(s, store, self.status, RECENT_LOGS.lines,
                                                                           self.inventory.to_json))
        console.sync_now = lambda: self.sync_loop.nudge() if self.sync_loop else None
        console.samples = self.samples
        managed = self.managed
        console.devices = Registry(s, store, (lambda: managed.refresh(store)) if managed else None)
        app = build_app(self.status, self.metrics, self.healthy, console, pages=install_console)
        self._http = http_server(app, h)
        self._tasks = [
            asyncio.create_task(self._http.serve(sockets=[sock]), name="http"),
            self._every(CONFIG_POLL_S, self._reload, "config-watch"),
            self._every(s.retention.prune_interval_s, self._prune, "retention"),
            self._every(SOURCES_FLUSH_S, self._flush_sources, "sources"),
            self._every(DEVICES_FLUSH_S, self._flush_devices, "devices"),
            self._every(UTILISATION_S, self.partitions.sample_cpu, "utilisation"),
            self._every(GIVE_BACK_CHECK_S, self.give_back.check, "give-back"),
        ]
        if watchdog is not None:
            self._tasks.append(watchdog)
        self.uploader.start()
        sync = make_sync(s, store, self.plans, threadsafe(self._app_states), threadsafe(self.healthy),
                         self.appstore, self.layout, self.request_restart, self.config_file)
        if sync is not None:
            self.sync_loop = SyncLoop(sync, s)
            console.upgrades = sync.upgrader
            self._tasks.append(asyncio.create_task(self.sync_loop.run(), name="appstore-sync"))
            trial, boot = sync.upgrader.trial, os.environ.get(BOOT_ENV, "")
            if self.layout is not None and trial is not None and boot:
                self.confirmation = HealthConfirmation(self.layout, trial, boot, self._trial_problems,
                                                       self._confirmed)
                self._tasks.append(asyncio.create_task(self.confirmation.run(), name="upgrade-confirmation"))
        log.info("appliance %s up: device %s, broker %s %s:%s, HTTP %s://%s:%s, state in %s", __version__,
                 s.device_id, s.broker.mode, s.broker.host, s.broker.port, "https" if h.tls else "http", h.host,
                 sock.getsockname()[1], s.state_dir.resolve())
        if not h.tls and not is_loopback(h.host) and h.host != "localhost":
            log.warning("the console is served over plain HTTP on %s: passwords and session cookies cross the "
                        "network unencrypted; set http.tls_cert and http.tls_key", h.host)
        notify("READY=1", f"STATUS=serving: device {s.device_id}, console on port {sock.getsockname()[1]}")

    async def _feed_watchdog(self) -> None:
        notify("WATCHDOG=1")

    async def _models_settled(self, timeout: float) -> None:
        """Wait until no model is loading any more, so the first frames are not refused for that."""
        changed = asyncio.Event()
        deadline = time.monotonic() + timeout
        def busy() -> bool:
            return any(w.state == "starting" or any(m.state == "loading" for m in w.models.values())
                       for w in self.workers.values())

        while busy():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("models still loading after %.0f s; serving what is ready", timeout)
                return
            changed.clear()
            for worker in self.workers.values():
                worker.on_change_once(changed.set)
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                pass

    async def _trial_problems(self, trial: Trial) -> list[str]:
        """What keeps this release, on trial, from confirming its health (empty: healthy)."""
        problems = []
        ok, reason = self.healthy()
        if not ok:
            problems.append(reason)
        states = self._app_states()
        problems += [f"app {name} is not serving" for name in trial.serving_apps
                     if (a := states.get(name)) is None or a.state != "serving"]
        console = await asyncio.to_thread(self._console_problem)
        if console:
            problems.append(console)
        reached = self.sync_loop.sync.reached if self.sync_loop else None
        if trial.appstore_reachable and (reached is None or reached < self.started):
            problems.append("the AppStore, reachable before the upgrade, has not been reached since this start")
        return problems

    def _console_problem(self) -> str:
        h = self.settings.http
        try:
            context = ssl._create_unverified_context() if h.tls else None  # our own certificate, on loopback
            urllib.request.urlopen(f"{'https' if h.tls else 'http'}://127.0.0.1:{self._http_port}/healthz", timeout=5,
                                   context=context).close()
        except urllib.error.HTTPError:
            pass  # it answered (503 while unhealthy): the console is up
        except (urllib.error.URLError, OSError) as e:
            return f"the console does not answer ({e})"
        return ""

    def _confirmed(self) -> None:
        if self.sync_loop is not None:
            upgrader = self.sync_loop.sync.upgrader
            upgrader.confirmed()
            asyncio.get_running_loop().run_in_executor(None, upgrader.after_confirmation)
            self.sync_loop.nudge()  # report "upgraded" now, not at the next timer

    def _app_states(self) -> dict[str, AppStatus]:
        return {a.name: a for a in (self.pipeline.app_status() if self.pipeline else [])}

    def _every(self, period: float, fn: Callable[[], Awaitable[object]], name: str) -> asyncio.Task[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(period)
                try:
                    await fn()
                except Exception:  # a failing timer is logged and tried again next period
                    log.exception("periodic task %s failed", name)

        return asyncio.create_task(loop(), name=name)

    async def stop(self) -> None:
        # no STOPPING=1: the launcher, systemd's main process, outlives a daemon it stops for a switch or a
        # take-back, and systemd would kill the whole unit when that launcher did not exit in time
        self.live.close()  # open console pages' streams end, so the HTTP server stops at once
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks:
            if task.get_name() != "http":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.ingest is not None:
            self.ingest.stop()
        if self.uploader is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.uploader.stop)
        if self.pipeline is not None:
            await self.pipeline.stop()
        for worker in self.workers.values():
            await worker.stop()
        await asyncio.get_running_loop().run_in_executor(
            None, self.mqtt.stop, (self.status_topic, self._status_payload("offline")))
        if self.broker is not None:
            self.broker.stop()
        if self.managed is not None:
            await asyncio.to_thread(self.managed.stop)
            await self._flush_devices()
        await self._flush_sources()
        if self.appstore is not None:
            self.appstore.close()
        if self.store is not None:
            self.store.close()
        log.info("appliance stopped")

    # timers

    async def _reload(self, force: bool = False) -> None:
        store, pipeline = self.store, self.pipeline
        assert store is not None and pipeline is not None
        loop = asyncio.get_running_loop()
        if self.managed is not None:
            try:
                await loop.run_in_executor(None, self.managed.refresh, store)
            except (OSError, StoreError, ValueError) as e:  # the models' and apps' reload goes on regardless
                log.error("cannot update the managed broker's files: %s", e)
        generation = await loop.run_in_executor(None, store.config_generation)
        if generation == self._generation and not force:
            return
        apps, models = await loop.run_in_executor(None, lambda: (store.apps.all(), store.models.all()))
        self._generation = generation
        measured = {k: m.memory_mb for w in self.workers.values() for k, m in w.models.items() if m.memory_mb}
        placed = placement_for(apps, models, self.plans, self.settings.placement.pins, self.placement, measured)
        for app, reason in placed.refused.items():
            log.error("app %s is not placed: %s", app, reason)
        self.placement = dict(placed.assignments)
        pipeline.reload(apps, models, self.placement, placed.refused)

    async def _prune(self) -> None:
        if self.events is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.events.prune)

    async def _flush_sources(self) -> None:
        if self.store is None:
            return
        rows: list[tuple[str, str, float]] = list(self.stats.last_seen())
        if rows:
            await asyncio.get_running_loop().run_in_executor(None, self.store.sources.touch, rows)

    async def _flush_devices(self) -> None:
        if self.managed is not None and self.store is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.managed.flush, self.store)
            except StoreError as e:
                log.error("cannot record what the managed broker saw of the devices: %s", e)

    # status

    def healthy(self) -> tuple[bool, str]:
        problems = []
        if self.broker is not None and not self.broker.running:
            problems.append("embedded broker is down")
        if self.managed is not None and not self.managed.running:
            problems.append("the managed broker (Mosquitto) is down")
        if not self.mqtt.connected:
            problems.append(f"not connected to the MQTT broker at {self.settings.broker.host}:{self.settings.broker.port}")
        for name, worker in self.workers.items():
            if worker.state != "ready":
                problems.append(f"worker {name} is {worker.state}")
        return (not problems, "; ".join(problems))

    def status(self) -> DaemonStatus:
        """Each component's part, put together."""
        s = self.settings
        ok, reason = self.healthy()
        workers = list(self.workers.values())
        pipeline, samples, uploader = self.pipeline, self.samples, self.uploader
        return DaemonStatus(
            device=s.device_id, version=__version__, uptime_s=round(time.time() - self.started, 1),
            health=Health(ok=ok, reason=reason), broker=self.mqtt.status(),
            partitions=tuple(self.partitions.status(self.placement)),
            workers=tuple(w.status() for w in workers),
            models=tuple(m for w in workers for m in w.model_status()),
            apps=tuple(pipeline.app_status() if pipeline else ()),
            sources=tuple(self.stats.sources()), unknown_sources=self.stats.unknown(),
            events=self.stats.event_counts(),
            appstore=self.sync_loop.sync.status() if self.sync_loop else SyncStatus(),
            upgrade=(self.sync_loop.sync.upgrade_status() if self.sync_loop else
                     UpgradeStatus(running=__version__, launcher=self.layout is not None)),
            samples=samples.status(uploader.status(), self._quota) if samples and uploader else None)


async def _serve(settings: Settings, ready: Callable[[Daemon], None] | None,
                 before_stop: Callable[[], None] | None, config_file: Path | None) -> int:
    daemon = Daemon(settings, config_file)
    stop = daemon.stopped
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()
        raise
    if ready is not None:
        ready(daemon)
    await stop.wait()
    log.info("stopping")
    if before_stop is not None:
        await loop.run_in_executor(None, before_stop)
    await daemon.stop()
    return daemon.exit_code


def run(settings: Settings, ready: Callable[[Daemon], None] | None = None,
        before_stop: Callable[[], None] | None = None, config_file: Path | None = None) -> int:
    """Run the daemon until SIGINT or SIGTERM (or a switch to another release); ``ready`` is called once it
    serves, ``before_stop`` first thing on the way out. Returns the exit code (RESTART_EXIT for a switch)."""
    use_timezone(settings)
    return asyncio.run(_serve(settings, ready, before_stop, config_file))
