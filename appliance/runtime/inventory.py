"""What hardware this box has: the CPU cores this process may use, host memory, NVIDIA GPUs and MIG instances.

CPUs and memory come from the operating system, GPUs from NVML through the ``NvmlReader`` seam. Without the
``nvidia-ml-py`` package, a driver or a GPU the inventory simply has no GPUs and ``nvml_error`` says why.

Example::

    inv = read_inventory()                                   # this machine
    inv = read_inventory(Path("site.json"))                  # a recorded inventory, source "file:site.json"
    inv = read_inventory(nvml=RecordedReader(Path("h100-mig7.json")))  # real CPUs, recorded GPUs
    print(format_inventory(inv))

The JSON format (``to_json``, ``appliance hardware --json`` and the recorded fixtures under
``tests/fixtures/inventory/``) is::

    {
      "cpu_cores": [0, 1, 2, 3],        # cores this process may run on (sched_getaffinity)
      "memory_mb": 64000,               # host RAM, MiB
      "gpus": [
        {
          "index": 0,                   # NVML index (PCI bus order)
          "uuid": "GPU-5c2d…",
          "name": "NVIDIA H100 80GB HBM3",
          "memory_mb": 81559,           # MiB, as nvidia-smi shows it
          "mig_enabled": true,          # current MIG mode; false on GPUs without MIG
          "mig_devices": [{"uuid": "MIG-4b1f…", "profile": "1g.10gb", "memory_mb": 9984}]
        }
      ],
      "nvml_error": null,               # why there are no GPUs, in one sentence, or null
      "source": "system"                # optional: "system" or "file:<path>"
    }

Memory is in MiB throughout ("MB" in messages, as nvidia-smi writes it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import ConfigError

MEMINFO = Path("/proc/meminfo")
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: a container's memory limit, or "max"


class NvmlUnavailable(Exception):
    """NVML cannot be asked about GPUs (no package, no driver, no GPU); the message says why in one sentence."""


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG instance: a CUDA process that sets ``CUDA_VISIBLE_DEVICES`` to ``uuid`` sees only it."""

    uuid: str  # MIG-…
    profile: str  # e.g. "1g.10gb", or "1c.3g.40gb" for a compute instance sharing a GPU instance
    memory_mb: int  # MiB

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "profile": self.profile, "memory_mb": self.memory_mb}


@dataclass(frozen=True, slots=True)
class Gpu:
    """One physical NVIDIA GPU."""

    index: int  # NVML index, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID
    uuid: str  # GPU-…
    name: str
    memory_mb: int  # MiB
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_mb": self.memory_mb,
                "mig_enabled": self.mig_enabled, "mig_devices": [m.to_json() for m in self.mig_devices]}


@dataclass(frozen=True, slots=True)
class Inventory:
    cpu_cores: tuple[int, ...]  # sorted
    memory_mb: int  # host RAM, MiB
    gpus: tuple[Gpu, ...] = ()
    source: str = "system"  # "system" or "file:<path>"
    nvml_error: str | None = None  # why NVML could not be asked, or None

    def to_json(self) -> dict[str, Any]:
        return {"cpu_cores": list(self.cpu_cores), "memory_mb": self.memory_mb,
                "gpus": [g.to_json() for g in self.gpus], "nvml_error": self.nvml_error, "source": self.source}

    @classmethod
    def from_json(cls, data: Any) -> Inventory:
        """Parse the format above; raise ValueError or TypeError naming the field that is wrong."""
        obj = _dict(data, "inventory")
        cores = _list(obj.get("cpu_cores"), "cpu_cores")
        nvml_error = obj.get("nvml_error")
        if nvml_error is not None and not isinstance(nvml_error, str):
            raise TypeError(f"nvml_error: expected a string or null, got {nvml_error!r}")
        source = obj.get("source", "file")
        if not isinstance(source, str):
            raise TypeError(f"source: expected a string, got {source!r}")
        return cls(
            cpu_cores=tuple(sorted(_int(c, f"cpu_cores[{i}]") for i, c in enumerate(cores))),
            memory_mb=_int(obj.get("memory_mb"), "memory_mb"),
            gpus=tuple(_gpu(g, f"gpus[{i}]") for i, g in enumerate(_list(obj.get("gpus", []), "gpus"))),
            source=source,
            nvml_error=nvml_error,
        )

    def gpu(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)

    def mig_device(self, uuid: str) -> tuple[Gpu, MigDevice] | None:
        """The MIG instance with this UUID and the GPU it lives on."""
        for g in self.gpus:
            for m in g.mig_devices:
                if m.uuid == uuid:
                    return g, m
        return None


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _gpu(data: Any, where: str) -> Gpu:
    obj = _dict(data, where)
    mig_enabled = obj.get("mig_enabled", False)
    if not isinstance(mig_enabled, bool):
        raise TypeError(f"{where}.mig_enabled: expected true or false, got {mig_enabled!r}")
    migs = []
    for i, m in enumerate(_list(obj.get("mig_devices", []), f"{where}.mig_devices")):
        mw = f"{where}.mig_devices[{i}]"
        mo = _dict(m, mw)
        migs.append(MigDevice(_str(mo.get("uuid"), f"{mw}.uuid"), _str(mo.get("profile"), f"{mw}.profile"),
                              _int(mo.get("memory_mb"), f"{mw}.memory_mb")))
    return Gpu(index=_int(obj.get("index"), f"{where}.index"), uuid=_str(obj.get("uuid"), f"{where}.uuid"),
               name=_str(obj.get("name"), f"{where}.name"), memory_mb=_int(obj.get("memory_mb"), f"{where}.memory_mb"),
               mig_enabled=mig_enabled, mig_devices=tuple(migs))


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """What a whole GPU is doing now. NVML reports utilisation per device, not per MIG instance."""

    utilisation_percent: int
    memory_used_mb: int


class NvmlReader(Protocol):
    """The seam to NVML: what the GPUs are and how busy they are, as plain data."""

    def gpus(self) -> tuple[Gpu, ...]:
        """Every GPU with its MIG instances; raise NvmlUnavailable (one sentence) when NVML cannot answer."""
        ...

    def usage(self, index: int) -> GpuUsage | None:
        """Utilisation and memory in use of GPU ``index``, or None when NVML cannot tell."""
        ...


_MIG_NAME = re.compile(r"\bMIG\s+(\S+)\s*$")


def mig_profile_from_name(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3 MIG 1g.10gb"`` (what NVML names a MIG device) -> ``"1g.10gb"``."""
    m = _MIG_NAME.search(name)
    return m.group(1) if m else None


class PynvmlReader:
    """Asks the NVIDIA driver through ``pynvml`` (package ``nvidia-ml-py``), imported only when asked."""

    def gpus(self) -> tuple[Gpu, ...]:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("the nvidia-ml-py package (pynvml) is not installed, so NVML cannot be asked") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(_init_failure(pynvml, e)) from e
        try:
            return tuple(self._gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount()))
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"NVML failed while listing the GPUs: {e}") from e
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def usage(self, index: int) -> GpuUsage | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except (ImportError, Exception):  # noqa: BLE001 - no driver: nothing to report
            return None
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return GpuUsage(int(rates.gpu), int(memory.used) // 2**20)
        except pynvml.NVMLError:  # e.g. NotSupported on a GPU in MIG mode
            return None
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def _gpu(self, nvml: Any, index: int) -> Gpu:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            mig_enabled = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
        except nvml.NVMLError_NotSupported:  # a GPU without MIG (anything before Ampere, consumer cards)
            mig_enabled = False
        migs: list[MigDevice] = []
        if mig_enabled:
            # the count is of possible MIG devices; the indices that exist are those that answer
            for mig_index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
                except nvml.NVMLError_NotFound:
                    continue
                migs.append(MigDevice(uuid=_text(nvml.nvmlDeviceGetUUID(mig)), profile=_mig_profile(nvml, handle, mig),
                                      memory_mb=nvml.nvmlDeviceGetMemoryInfo(mig).total // 2**20))
        return Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)), name=_text(nvml.nvmlDeviceGetName(handle)),
                   memory_mb=nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20, mig_enabled=mig_enabled,
                   mig_devices=tuple(migs))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _mig_profile(nvml: Any, parent: Any, mig: Any) -> str:
    """The profile from the MIG device's name; failing that, the name of its GPU instance's profile."""
    profile = mig_profile_from_name(_text(nvml.nvmlDeviceGetName(mig)))
    if profile:
        return profile
    try:
        instance = nvml.nvmlDeviceGetGpuInstanceById(parent, nvml.nvmlDeviceGetGpuInstanceId(mig))
        profile_id = nvml.nvmlGpuInstanceGetInfo(instance).profileId
        for profile_index in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(parent, profile_index)  # v2: has a name
            except nvml.NVMLError:
                continue
            if info.id == profile_id:
                return mig_profile_from_name(_text(info.name)) or _text(info.name)
    except nvml.NVMLError:
        pass
    return "unknown"


def _init_failure(nvml: Any, e: Exception) -> str:
    reasons = {
        "NVMLError_LibraryNotFound": "no NVIDIA driver is installed: the NVML library libnvidia-ml.so.1 was not found",
        "NVMLError_DriverNotLoaded": "the NVIDIA driver is installed but not loaded",
        "NVMLError_NoPermission": "this process may not talk to the NVIDIA driver",
    }
    for name, reason in reasons.items():
        cls = getattr(nvml, name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return reason
    return f"NVML could not start: {e}"


class RecordedReader:
    """GPUs from a recorded inventory (the JSON format above): the NVML seam for tests and offline planning."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def gpus(self) -> tuple[Gpu, ...]:
        inv = load_inventory_file(self.path)
        if not inv.gpus and inv.nvml_error:
            raise NvmlUnavailable(inv.nvml_error)
        return inv.gpus

    def usage(self, index: int) -> GpuUsage | None:
        """From the file's optional ``"usage": {"<index>": {"utilisation_percent": .., "memory_used_mb": ..}}``."""
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8")).get("usage", {}).get(str(index))
            return GpuUsage(int(entry["utilisation_percent"]), int(entry["memory_used_mb"])) if entry else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None


def load_inventory_file(path: Path) -> Inventory:
    """A recorded inventory, with source ``file:<path>``; ConfigError naming the file if it cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"inventory file {path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"inventory file {path}: cannot read: {e.strerror}") from e
    except ValueError as e:
        raise ConfigError(f"inventory file {path}: not valid JSON: {e}") from e
    try:
        inv = Inventory.from_json(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"inventory file {path}: {e}") from e
    return replace(inv, source=f"file:{path}")


def host_memory_mb() -> int:
    """Host RAM in MiB, or the container's cgroup limit when that is lower."""
    total = 0
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024  # kB
                break
    except (OSError, ValueError, IndexError):
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    try:
        limit = CGROUP_MEMORY_MAX.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit) // 2**20) if limit.isdigit() else total


def read_inventory(inventory_file: Path | None = None, nvml: NvmlReader | None = None) -> Inventory:
    """This machine's inventory (GPUs through ``nvml``, default PynvmlReader), or the whole of ``inventory_file``."""
    if inventory_file is not None:
        return load_inventory_file(inventory_file)
    reader = nvml or PynvmlReader()
    try:
        gpus, error = reader.gpus(), None
    except NvmlUnavailable as e:
        gpus, error = (), str(e)
    return Inventory(cpu_cores=tuple(sorted(os.sched_getaffinity(0))), memory_mb=host_memory_mb(), gpus=gpus,
                     source="system", nvml_error=error)


def format_cores(cores: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    out: list[str] = []
    values = sorted(set(cores))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def format_inventory(inv: Inventory) -> str:
    """The text ``appliance hardware`` prints."""
    lines = [f"inventory: {inv.source}",
             f"CPU: {len(inv.cpu_cores)} cores ({format_cores(inv.cpu_cores)})",
             f"memory: {inv.memory_mb} MB"]
    if not inv.gpus:
        lines.append(f"no NVIDIA GPU found ({inv.nvml_error or 'NVML lists none'})")
    for g in inv.gpus:
        lines.append(f"cuda:{g.index} {g.name}: {g.memory_mb} MB, MIG {'on' if g.mig_enabled else 'off'}  {g.uuid}")
        if g.mig_enabled and not g.mig_devices:
            lines.append("  no MIG instances created (nvidia-smi mig -cgi … -C)")
        for m in g.mig_devices:
            lines.append(f"  mig:{m.uuid}  {m.profile:<10} {m.memory_mb} MB")
    return "\n".join(lines)


__all__ = [
    "Gpu",
    "Inventory",
    "MigDevice",
    "NvmlReader",
    "NvmlUnavailable",
    "PynvmlReader",
    "RecordedReader",
    "format_cores",
    "format_inventory",
    "host_memory_mb",
    "load_inventory_file",
    "mig_profile_from_name",
    "read_inventory",
]
