"""The daemon's status as a typed tree: what ``appliance status``, ``/api/v1/status``, the console and the
support bundle show.

Each part is a frozen model that the component owning the state returns; the daemon only puts them together::

    DaemonStatus(device=..., health=daemon.healthy(), broker=mqtt.status(),
                 partitions=monitor.status(placement), workers=[w.status() for w in workers],
                 models=[m for w in workers for m in w.model_status()], apps=pipeline.app_status(),
                 sources=stats.sources(), unknown_sources=stats.unknown(), events=stats.event_counts(),
                 appstore=sync.status(), samples=capture.status(uploader.status()))

The JSON is ``model_dump(mode="json")`` of :class:`DaemonStatus`; the CLI reads it back with
``DaemonStatus.model_validate``. This module imports nothing of the daemon, so every component, the CLI and
the HTTP layer can depend on it; the words a state may take (``WorkerState``, ``SyncState``...) are defined
here once and imported by the components that set them. Provisioning has no part yet: it gets one when the
daemon carries that state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from formats.channel import UpgradeStateName

PartitionKind = Literal["cpu", "gpu", "mig", "slice"]
WorkerState = Literal["starting", "ready", "restarting", "stopped"]
ModelState = Literal["loading", "ready", "failed", "quarantined"]
AppState = Literal["serving", "degraded", "disabled", "not placed"]
SourceKind = Literal["camera", "sensor"]
SourceState = Literal["receiving", "silent", "rejecting"]
SyncState = Literal["off", "starting", "syncing", "in sync", "offline", "refused"]
# the appliance's own upgrade (docs/upgrade.md): the words of the device report, declared with it
UpgradeState = UpgradeStateName

__all__ = [
    "AppState", "AppStatus", "BrokerStatus", "CatalogApp", "DaemonStatus", "DetectionStatus", "Download", "Health",
    "LastReject", "LastResult", "ModelState", "ModelStatus", "PartitionKind", "PartitionStatus", "SampleCounts",
    "SampleQuota", "SamplesStatus", "SourceKind", "SourceState", "SourceStatus", "SyncState", "SyncStatus",
    "UnknownSource", "UnknownSources", "UpgradeHistory", "UpgradeState", "UpgradeStatus", "UploaderStatus",
    "WorkerState", "WorkerStatus",
]


class _Part(BaseModel):
    # extra="forbid": a part built with a misspelt field, or a status this version does not know, fails loudly
    model_config = ConfigDict(frozen=True, extra="forbid")


class Health(_Part):
    ok: bool
    reason: str = Field(default="", description="what is wrong, in words; empty when ok")


class BrokerStatus(_Part):
    mode: Literal["embedded", "external", "managed"]
    host: str
    port: int
    protocol: Literal["3.1.1", "5"] = Field(description="the MQTT version the daemon speaks to the broker")
    connected: bool


class PartitionStatus(_Part):
    name: str
    device: str = Field(description='as declared: "cpu", "cuda:N" or "mig:<UUID>"')
    kind: PartitionKind
    cores: tuple[int, ...] = Field(description="CPU partitions: the cores the worker is pinned to")
    memory_mb: int | None = Field(description="MiB the placement packs against (null: no limit)")
    compute_percent: int = Field(description="below 100 only for soft GPU slices")
    provider: str = Field(description="the execution provider every session must get")
    env: dict[str, str] = Field(description="set in the worker before ONNX Runtime loads")
    worker: WorkerState
    memory_used_mb: float = Field(description="measured by the ready models at load")
    apps: tuple[str, ...] = Field(description="the apps placed here")
    utilisation_percent: float | None = Field(description="null when there is no reading (see the note)")
    utilisation_note: str = Field(description="what the utilisation is of, or why there is none")
    gpu_memory_used_mb: float | None = Field(default=None, description="the whole GPU's, from NVML")
    error: str = Field(description="a fallback away from the provider, in words; empty when none")


class WorkerStatus(_Part):
    partition: str
    state: WorkerState
    pid: int | None
    threads: int = Field(description="ONNX Runtime intra-op threads per session, as the worker set them")
    executors: int = Field(description="jobs the worker runs at once")
    alone_threads: int = Field(0, description="intra-op threads of a frame that has the worker to itself "
                                              "(0: it runs as the others do)")
    restarts: int
    last_restart_reason: str
    inflight: int = Field(description="jobs handed to the worker and not answered yet")


class ModelStatus(_Part):
    key: str = Field(description="name@version")
    state: ModelState
    reason: str
    providers: tuple[str, ...] = Field(description="the execution providers the session got, preferred first")
    partition: str
    memory_mb: float = Field(description="measured at load")
    io_binding: bool = Field(False, description="each frame's input is placed on the GPU before the run "
                                                "(ONNX Runtime's I/O binding); false on the CPU")


class AppStatus(_Part):
    name: str
    version: str
    model: str = Field(description="the model key (name@version) the app runs now")
    partition: str | None = Field(description="null: not placed")
    sources: tuple[str, ...] = Field(description="MQTT topic filters")
    state: AppState
    reason: str
    swap: str = Field(description="what happened to the last model swap, in words")
    events: int = Field(description="events since the daemon started")


class DetectionStatus(_Part):
    label: str
    score: float
    box: tuple[float, float, float, float] | None = Field(description="x1, y1, x2, y2 in 0..1 of the frame")


class LastResult(_Part):
    ts: float = Field(description="capture time of the frame")
    app: str
    detections: tuple[DetectionStatus, ...] = Field(description="the first five")


class LastReject(_Part):
    ts: float
    reason: str
    detail: str


class SourceStatus(_Part):
    id: str
    kind: SourceKind
    state: SourceState
    reason: str = Field(description="why the source is silent or rejecting; empty when receiving")
    received: int
    processed: int
    skipped: int = Field(description="replaced by a newer message before it was served")
    rejected: dict[str, int] = Field(description="reason -> count")
    fps_received: float
    fps_processed: float
    fps_skipped: float
    last_seen: float | None
    last_reject: LastReject | None
    last_values: dict[str, float] = Field(description="sensors: the latest value of each channel")
    last_result: LastResult | None = None


class UnknownSource(_Part):
    id: str
    last_seen: float
    count: int


class UnknownSources(_Part):
    """Messages from sources no enabled app listens to."""

    rejected: dict[str, int] = Field(description="reason -> count, since the daemon started")
    recent: tuple[UnknownSource, ...] = Field(description="the latest distinct ids, oldest first")


class CatalogApp(_Part):
    name: str
    versions: tuple[str, ...]
    latest: str
    description: str
    model: str = Field(description="name@version of the model the latest version needs")


class Download(_Part):
    url: str = Field(description="the target's file name")
    received: int = Field(description="bytes")
    total: int = Field(description="bytes at most (the length signed in the metadata)")


class SyncStatus(_Part):
    """The link to the AppStore; ``state`` "off" (and nothing else set) when no AppStore is configured."""

    state: SyncState = "off"
    url: str = ""
    channel: str = ""
    group: str = ""
    rollout: str | None = Field(default=None, description="the rollout this appliance takes part in")
    catalog_version: int | None = None
    last_sync: float | None = Field(default=None, description="the last pass that verified and reconciled all")
    last_attempt: float | None = None
    last_error: str = ""
    next_try_s: float | None = None
    desired: dict[str, str] = Field(default_factory=dict, description="app -> version")
    refused: dict[str, str] = Field(default_factory=dict, description="app -> why its desired version is not running")
    catalog: tuple[CatalogApp, ...] = Field(default=(), description="the published apps")
    downloads: tuple[Download, ...] = Field(default=(), description="downloads under way")


class UpgradeHistory(_Part):
    ts: float
    from_version: str
    to_version: str
    outcome: str = Field(description="confirmed, rolled back, rollback (an admin's) or refused")
    reason: str = ""


class UpgradeStatus(_Part):
    """The appliance's own release: what runs, what the channel asks for, and an upgrade under way."""

    running: str
    previous: str | None = Field(default=None, description="the release kept to go back to")
    desired: str | None = Field(default=None, description="what the channel (or its rollout) asks for")
    state: UpgradeState = "idle"
    reason: str = ""
    received: int = Field(default=0, description="bytes of the release downloaded so far")
    total: int = Field(default=0, description="bytes of the release this box lacks")
    launcher: bool = Field(default=False, description="started by appliance-launcher (upgrades need it)")
    window: str = Field(default="", description="local time during which a switch may happen; empty: any time")
    postponed_until: float | None = None
    history: tuple[UpgradeHistory, ...] = ()


class SampleCounts(_Part):
    queued: int = 0
    uploaded: int = 0
    refused: int = Field(default=0, description="refused by the AppStore as malformed; not sent again")
    queued_bytes: int = 0


class UploaderStatus(_Part):
    state: str = Field(description="off, idle, uploading, retrying, no AppStore")
    uploaded: int = Field(description="since the daemon started")
    refused: int = Field(description="since the daemon started: records the AppStore refused as malformed")
    last_refusal: str = Field(description="the AppStore's reason for the last refusal")
    last_upload: float | None
    last_error: str
    next_try_s: float | None
    policy: Literal["off", "metadata-only", "full"] = Field(description="what leaves the site")
    redact: tuple[str, ...] = Field(description="labels whose regions are blurred before upload")


class SampleQuota(_Part):
    bytes: int
    count: int


class SamplesStatus(_Part):
    by_reason: dict[str, SampleCounts]
    dropped: dict[str, int] = Field(description="reason -> samples not kept because the spool was full")
    uploader: UploaderStatus
    skipped_busy: int = Field(description="samples skipped because the disk was busy with earlier ones")
    quota: SampleQuota


class DaemonStatus(_Part):
    """``GET /api/v1/status``: everything ``appliance status`` shows."""

    device: str
    version: str
    uptime_s: float
    health: Health
    broker: BrokerStatus
    partitions: tuple[PartitionStatus, ...] = ()
    workers: tuple[WorkerStatus, ...] = ()
    models: tuple[ModelStatus, ...] = ()
    apps: tuple[AppStatus, ...] = ()
    sources: tuple[SourceStatus, ...] = ()
    unknown_sources: UnknownSources = UnknownSources(rejected={}, recent=())
    events: dict[str, int] = Field(default_factory=dict, description="app -> events since the daemon started")
    appstore: SyncStatus = SyncStatus()
    upgrade: UpgradeStatus | None = Field(default=None, description="null until the daemon has started")
    samples: SamplesStatus | None = Field(default=None, description="null until the daemon has started")

    def app(self, name: str) -> AppStatus | None:
        return next((a for a in self.apps if a.name == name), None)
