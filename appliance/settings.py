"""The appliance's one settings tree: defaults, then a TOML file, then environment overrides.

Environment overrides use the prefix ``APPLIANCE_`` and ``__`` between levels, e.g.
``APPLIANCE_BROKER__PORT=1884`` or ``APPLIANCE_HTTP__HOST=0.0.0.0``. Values are parsed as TOML
scalars when they can be (``1884`` is an int, ``true`` a bool), otherwise taken as strings.

An unknown or invalid key fails at start with a message naming the key and where it came from.
"""

from __future__ import annotations

import os
import socket
import time
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.errors import ConfigError
from formats.app_manifest import SamplePolicyOverride
from formats.errors import describe_validation_error

ENV_PREFIX = "APPLIANCE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    # embedded: amqtt in the daemon, loopback only (development, the demo); external: a broker the site runs;
    # managed: Mosquitto run by the appliance from its device registry (docs/devices.md), how a site runs
    mode: Literal["embedded", "external", "managed"] = "embedded"
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    # MQTT 5 carries the capture time (user property "ts"); the embedded broker (amqtt) speaks 3.1.1 only
    protocol: Literal["auto", "3.1.1", "5"] = "auto"
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=5)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # managed mode: where cameras and sensors connect (TLS), the names they use for the box (in the broker's
    # certificate), how long a device certificate lasts, and the Mosquitto to run
    device_host: str = "0.0.0.0"
    device_port: int = Field(default=8883, ge=1, le=65535)  # devices with a client certificate
    password_port: int = Field(default=8884, ge=1, le=65535)  # devices with a user name and password
    device_names: list[str] = []
    certificate_days: int = Field(default=825, ge=1, le=3650)
    allow_anonymous_loopback: bool = False  # development only: anonymous publishers on 127.0.0.1:anonymous_port
    anonymous_port: int = Field(default=1884, ge=1, le=65535)
    mosquitto: str = "mosquitto"
    # who runs the managed Mosquitto: the daemon, as its child; or systemd (the OS image's
    # appliance-broker.service, in a sandbox of its own), which logs to run_dir for the daemon to follow
    supervisor: Literal["daemon", "systemd"] = "daemon"
    run_dir: Path = Path("/run/appliance-broker")

    @model_validator(mode="after")
    def _check(self) -> BrokerSettings:
        if self.mode == "embedded" and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the embedded broker listens on loopback only; use mode = \"external\" for other hosts")
        if self.mode == "managed" and self.host not in ("127.0.0.1", "localhost"):
            raise ValueError("the daemon reaches its managed broker on loopback; devices use device_host")
        if self.mode == "managed" and self.device_host in ("0.0.0.0", "::") and not self.device_names:
            raise ValueError("device_names: say how cameras and sensors reach this box (its address or host name, "
                             "e.g. [\"192.168.10.5\"]); the broker's certificate names them")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def mqtt_version(self) -> Literal["3.1.1", "5"]:
        if self.protocol != "auto":
            return self.protocol
        return "3.1.1" if self.mode == "embedded" else "5"


class TopicSettings(_Section):
    cameras: str = "cameras"  # cameras/{source}/frame
    sensors: str = "sensors"  # sensors/{source}/telemetry
    appliance: str = "appliance"  # appliance/{device}/status|events|commands


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # HTTPS for the console and API: a PEM certificate (chain) and its key, given together; the session
    # cookie is then marked Secure. Without them the server speaks plain HTTP (fine on loopback).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class IngestSettings(_Section):
    max_frame_bytes: int = Field(default=8 * 1024 * 1024, gt=0)  # bytes
    max_telemetry_bytes: int = Field(default=64 * 1024, gt=0)  # bytes
    max_image_pixels: int = Field(default=40_000_000, gt=0)  # pixels, guards against decompression bombs
    telemetry_queue: int = Field(default=16, ge=1)  # samples kept per sensor when inference lags
    source_silent_s: float = Field(default=30.0, gt=0)  # seconds without data before a source reads silent
    # what is remembered per source, bounded however many camera ids come and go (appliance.stats):
    latest_frames_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # bytes, all cameras' latest frames for the console
    source_forget_s: float = Field(default=86400.0, gt=0)  # seconds of silence before a source is forgotten
    unknown_sources_kept: int = Field(default=64, ge=0)  # ids of sources no app listens to, shown in status

    @model_validator(mode="after")
    def _check(self) -> IngestSettings:
        if self.source_forget_s < self.source_silent_s:
            raise ValueError("source_forget_s must be at least source_silent_s: a source reads silent before it "
                             "is forgotten")
        return self


class RuntimeSettings(_Section):
    max_inflight: int = Field(default=2, ge=1)  # jobs handed to a worker before it answers
    inference_timeout_s: float = Field(default=10.0, gt=0)  # a job running longer gets its worker killed
    load_timeout_s: float = Field(default=300.0, gt=0)  # loading + warming up one model (TensorRT builds are slow)
    restart_backoff_min_s: float = Field(default=0.5, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    strikes_before_quarantine: int = Field(default=3, ge=1)  # hangs/crashes of one model before it is stopped
    # jobs a worker runs at once, each on its own thread; 0: one per core of a CPU partition, one on a GPU
    executors: int = Field(default=0, ge=0, le=64)
    # per session, shared by its executors; 0: a CPU partition's cores shared out among them (1 each by default)
    intra_op_threads: int = Field(default=0, ge=0)
    # a frame that has a CPU worker to itself runs on every core of the partition, on a second session of its
    # model (memory: about one more session per model); false: a lone frame runs on one core
    lone_frame_all_cores: bool = True
    # dynamic batching: up to max_batch frames for one model run together (models with a dynamic first axis).
    # 0: 1 on a CPU partition (its executors run frames side by side instead) and 8 on a GPU, where the frames
    # that came while the device was busy run in one go. A worker waits up to max_batch_delay_ms for more
    # frames to fill a batch; 0 (the default) takes only the frames already waiting, adding no latency.
    max_batch: int = Field(default=0, ge=0, le=64)
    max_batch_delay_ms: float = Field(default=0.0, ge=0)


class RetentionSettings(_Section):
    max_age_days: float = Field(default=30.0, gt=0)
    max_snapshot_bytes: int = Field(default=2 * 1024**3, gt=0)  # bytes of snapshots on disk
    prune_interval_s: float = Field(default=60.0, gt=0)


class PartitionSettings(_Section):
    """One slice of the machine served by one worker process (see docs/partitions.md)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    # "cpu", "cuda:N" (a whole GPU, or a soft slice with memory_mb/compute_percent) or "mig:<UUID>"
    device: str = Field(pattern=r"^(cpu|cuda:[0-9]+|mig:[A-Za-z0-9-]+)$")
    cores: list[int] | None = None  # CPU partitions: the cores the worker is pinned to (default: all left over)
    memory_mb: int | None = Field(default=None, gt=0)  # GPU: memory cap (gpu_mem_limit); CPU: admission budget
    compute_percent: int | None = Field(default=None, ge=1, le=100)  # soft GPU slice: MPS active thread percentage
    tensorrt: bool = False  # GPU: try the TensorRT execution provider first (engines cached under state_dir)

    @model_validator(mode="after")
    def _fits_kind(self) -> PartitionSettings:
        if self.device != "cpu" and self.cores is not None:
            raise ValueError(f"partition {self.name}: cores apply to cpu partitions only")
        if self.device == "cpu" and (self.compute_percent is not None or self.tensorrt):
            raise ValueError(f"partition {self.name}: compute_percent and tensorrt apply to GPU partitions only")
        if self.device.startswith("mig:") and self.compute_percent is not None:
            raise ValueError(f"partition {self.name}: a MIG instance is already isolated; drop compute_percent")
        if self.cores is not None and (not self.cores or len(set(self.cores)) != len(self.cores)):
            raise ValueError(f"partition {self.name}: cores must be a non-empty list without repeats")
        return self


class HardwareSettings(_Section):
    # Use this recorded inventory (JSON, the format `appliance hardware --json` prints) instead of asking the
    # operating system and NVML: for planning a site offline, labs and tests.
    inventory_file: Path | None = None


class PlacementSettings(_Section):
    pins: dict[str, str] = Field(default_factory=dict)  # app name -> partition name it must run in


class OutputSettings(_Section):
    # publish every result (not only events) on appliance/{device}/results: for integrations and benchmarks
    results: bool = False


class AppStoreSettings(_Section):
    """The link to the central AppStore (docs/appstore.md); off while ``url`` is unset. Until provisioning
    exists, the trusted root, the channel and the device token come from here."""

    url: str | None = None  # e.g. https://store.example.com/ (serves metadata/, targets/ and the fleet API)
    root: Path | None = None  # the trusted TUF root.json (from provisioning): nothing unsigned by it installs
    channel: str = Field(default="stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    group: str = ""  # a named group for staged rollouts (e.g. "canary"); "" for none
    device_token: str | None = None  # authenticates this appliance's reports (appstore devices add)
    refresh_s: float = Field(default=60.0, ge=1.0)  # how often to look for changes (a nudge: {"cmd": "sync"})
    activation_timeout_s: float = Field(default=120.0, gt=0)  # a new version must be serving by then
    retry_max_s: float = Field(default=300.0, ge=1.0)  # backoff cap while the AppStore cannot be reached
    ca_file: Path | None = None  # HTTPS: the CA to trust (default: the system's)
    cert_file: Path | None = None  # HTTPS client certificate, if the AppStore asks for one
    key_file: Path | None = None

    @model_validator(mode="after")
    def _root_with_url(self) -> AppStoreSettings:
        if self.url and self.root is None:
            raise ValueError("appstore.url needs appstore.root: the trusted root.json that signs the AppStore")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"appstore.url must start with http:// or https://, not {self.url!r}")
        return self


_WINDOW = r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$"


class UpgradeSettings(_Section):
    """The appliance's own upgrades (docs/upgrade.md): when they may happen and what is kept."""

    # local time during which a new release may be switched to, e.g. "02:00-05:00" (may cross midnight);
    # "" for any time. Downloading, installing and testing happen at any time; only the restart waits.
    window: str = Field(default="", pattern=rf"({_WINDOW})|^$")
    keep_releases: int = Field(default=2, ge=2)  # releases kept on disk: the current and the one to go back to
    python: Path | None = None  # the interpreter new releases run on (default: the one this release runs on)
    cache_dir: Path | None = None  # uv's cache: releases hard-link their files from it (default: ROOT/cache/uv)


class SamplesSettings(_Section):
    """Hard samples (docs/samples.md): what the site keeps, and what may leave it."""

    # off: nothing leaves the site (the default for a new site); metadata-only: predictions and context, no
    # pixels; full: the frame too, with the regions of redact_labels blurred first
    upload: Literal["off", "metadata-only", "full"] = "off"
    redact_labels: list[str] = Field(default_factory=list)  # e.g. ["person", "face"]: blurred before upload
    site: str = ""  # a name for this site in the samples' metadata
    quota_bytes: int = Field(default=512 * 1024 * 1024, gt=0)  # the spool's size on disk
    quota_count: int = Field(default=5000, gt=0)
    min_free_bytes: int = Field(default=1024 * 1024 * 1024, ge=0)  # no capture when the disk has less free
    jpeg_quality: int = Field(default=90, ge=30, le=100)
    max_side: int = Field(default=1920, ge=64)  # larger frames are scaled down before they are kept
    upload_interval_s: float = Field(default=10.0, gt=0)
    batch: int = Field(default=20, ge=1)  # samples sent per pass
    bandwidth_kbps: float = Field(default=0.0, ge=0)  # 0: no cap
    retry_max_s: float = Field(default=300.0, ge=1)
    apps: dict[str, SamplePolicyOverride] = Field(default_factory=dict)  # app name -> its policy, changed here


class Settings(_Section):
    device_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "appliance")
    state_dir: Path = Path(".appliance")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    timezone: str = ""  # IANA name (e.g. Asia/Shanghai) for local times (window, console); "" keeps the system's
    broker: BrokerSettings = BrokerSettings()
    topics: TopicSettings = TopicSettings()
    http: HttpSettings = HttpSettings()
    ingest: IngestSettings = IngestSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    retention: RetentionSettings = RetentionSettings()
    hardware: HardwareSettings = HardwareSettings()
    placement: PlacementSettings = PlacementSettings()
    outputs: OutputSettings = OutputSettings()
    appstore: AppStoreSettings = AppStoreSettings()
    samples: SamplesSettings = SamplesSettings()
    upgrade: UpgradeSettings = UpgradeSettings()
    # "auto": one partition per MIG instance, whole GPUs otherwise, the remaining CPU cores as one CPU partition
    partitions: Literal["auto"] | list[PartitionSettings] = "auto"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        if value:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a time zone this system knows; use an IANA name such as "
                                 "Asia/Shanghai or Europe/Berlin") from None
        return value

    @model_validator(mode="after")
    def _unique_partition_names(self) -> Settings:
        if isinstance(self.partitions, list):
            names = [p.name for p in self.partitions]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"partition names must be unique: {', '.join(dupes)} declared more than once")
        return self

    @property
    def db_path(self) -> Path:
        return self.state_dir / "appliance.db"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def snapshots_dir(self) -> Path:
        return self.state_dir / "snapshots"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node[path[-1]] = value
    return tree


def merge_trees(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, table by table (a key in both tables of the same name: ``top``'s value)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _origin(key: tuple[Any, ...], env: dict[str, Any], file: Path | None) -> str:
    node: Any = env
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return str(file) if file else "defaults"
        node = node[part]
    return "environment " + ENV_PREFIX + "__".join(str(p).upper() for p in key)


def load_settings(path: Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (TOML, optional) and the environment; raise ConfigError naming the bad key."""
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such settings file") from e
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    env = _env_overrides(environ)
    try:
        return Settings.model_validate(merge_trees(data, env))
    except ValidationError as e:
        detail = describe_validation_error(e, lambda key: _origin(key, env, path), docs="docs/configuration.md")
        raise ConfigError("invalid settings:\n  " + detail.replace("\n", "\n  ")) from e


def use_timezone(settings: Settings) -> None:
    """Make ``settings.timezone`` this process's local time (the maintenance window, the console's times);
    call it before the console is imported, which reads the zone once."""
    if settings.timezone:
        os.environ["TZ"] = settings.timezone
        time.tzset()
