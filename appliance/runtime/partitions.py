"""From the ``partitions`` settings and the inventory to a validated plan: one worker process per partition.

A pure computation (the one side effect, creating a TensorRT engine cache folder, is in ``session_providers``).
Every problem in the declared partitions is reported at once, in a ``PartitionError`` whose message names the
partitions and the numbers.

Example::

    inv = read_inventory(Path("tests/fixtures/inventory/t4-single.json"))
    [gpu0, cpu] = plan_partitions("auto", inv, Path(".appliance/tensorrt-cache"))
    gpu0.env          # {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    gpu0.providers    # (("CUDAExecutionProvider", {"device_id": "0", "gpu_mem_limit": "16106127360", ...}),
                      #  ("CPUExecutionProvider", {}))
    cpu.cores         # (1, 2, 3, 4, 5, 6, 7): core 0 is left to the management plane

``"auto"``:

- a GPU in MIG mode gives one partition per MIG instance, named ``gpu<G>-mig<N>`` (G the GPU's NVML index, N the
  MIG device's index on it, as ``nvidia-smi -L`` numbers them), so names stay put when a GPU is added; a MIG-mode
  GPU without instances gives none;
- any other GPU is one whole-GPU partition ``gpu<G>``;
- the CPU cores are one partition ``cpu``. With a GPU partition and more than 2 cores, the lowest core is kept out
  of it for the management plane (the daemon, ingest, the GPU workers' host threads).

Declared partitions (``[[partitions]]``):

- ``cpu``: pinned to ``cores``; without ``cores``, every allowed core no other cpu partition lists.
- ``cuda:N`` without ``memory_mb`` and ``compute_percent`` takes the whole GPU (kind ``gpu``); with either it is a
  soft slice (kind ``slice``). Slices on one GPU share its memory and compute: one that leaves a number out gets an
  even share of what the others leave, and every slice runs with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (which
  takes effect under an MPS daemon; without one the slices time-share the GPU).
- ``mig:<UUID>``: the MIG instance (kind ``mig``); several partitions on one instance share its memory like slices.

Memory (``memory_mb``, MiB) is what admission packs models against: for GPU kinds the cap handed to ONNX Runtime
as ``gpu_mem_limit``, else the whole GPU or MIG instance; for cpu the configured budget, else an even share of the
host memory the other cpu partitions leave.

``CUDA_VISIBLE_DEVICES`` leaves the worker one device, so ONNX Runtime's ``device_id`` is always ``"0"``; the GPU
is named by its NVML index, which CUDA uses too only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (set alongside).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from appliance.errors import ConfigError
from appliance.runtime.inventory import Gpu, Inventory, MigDevice, format_cores
from appliance.settings import PartitionSettings
from appliance.status import PartitionKind

Providers = tuple[tuple[str, dict[str, str]], ...]

# A GPU worker's ONNX Runtime threads only run the few nodes left on the CPU and feed the GPU; two keep a
# copy or a small op from stalling the stream without taking cores from the cpu partition.
GPU_INTRA_OP_THREADS: Final = 2
# Two frames at once on a GPU partition: one is decoded and preprocessed on the host while the other runs on the
# device (one executor would leave the GPU idle during every decode); GPU_MAX_BATCH stacks frames that wait.
GPU_EXECUTORS: Final = 2
# Frames that came while a GPU was busy run through a model at once (where its first axis is dynamic), up to
# this many: one run of 8 costs the device far less than 8 runs, and a frame waits for no other to come.
GPU_MAX_BATCH: Final = 8
MANAGEMENT_CORES: Final = 1  # auto, with GPU partitions and more than 2 cores: kept out of the cpu partition
CPU_PROVIDERS: Final[Providers] = (("CPUExecutionProvider", {}),)


class PartitionError(ConfigError):
    """The declared partitions do not fit this box; ``problems`` holds one sentence per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems with the partitions:\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)

    def __reduce__(self) -> tuple[type[PartitionError], tuple[tuple[str, ...]]]:
        return (PartitionError, (self.problems,))


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """One partition as its worker runs it."""

    name: str
    device: str  # as declared: "cpu", "cuda:N" or "mig:<UUID>"
    kind: PartitionKind
    cores: tuple[int, ...] = ()  # cpu: the cores the worker is pinned to; GPU kinds: () (not pinned)
    memory_mb: int | None = None  # MiB, the limit admission packs against
    compute_percent: int = 100  # below 100 only for soft slices
    env: dict[str, str] = field(default_factory=dict)  # set in the worker before ONNX Runtime loads
    providers: Providers = CPU_PROVIDERS  # for onnxruntime.InferenceSession(providers=...), preferred first
    intra_op_threads: int = 1  # per session and executor
    executors: int = 1  # jobs the worker runs at once (threads, each with its own intra-op threads)
    max_batch: int = 1  # frames waiting for the same model that run through it at once (where it allows it)
    gpu_index: int | None = None  # NVML index of the GPU this partition is on (also for MIG), for utilisation

    def threads_for(self, executors: int) -> int:
        """Intra-op threads per session when the worker runs ``executors`` executors: on a CPU partition its
        cores shared out among them (one executor gets them all); on a GPU the plan's own."""
        if self.kind == "cpu" and self.cores:
            return max(1, len(self.cores) // max(1, executors))
        return self.intra_op_threads

    @property
    def expected_provider(self) -> str:
        """What every session must report first; anything else means ONNX Runtime fell back (an error state)."""
        return self.providers[0][0]


def session_providers(plan: PartitionPlan) -> list[tuple[str, dict[str, str]]]:
    """The providers in the form ``onnxruntime.InferenceSession`` takes; creates the TensorRT engine cache folder."""
    for name, options in plan.providers:
        if name == "TensorrtExecutionProvider" and options.get("trt_engine_cache_path"):
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    return [(name, dict(options)) for name, options in plan.providers]


def plan_partitions(partitions: Literal["auto"] | list[PartitionSettings], inventory: Inventory,
                    trt_cache_dir: Path) -> list[PartitionPlan]:
    """The partitions to run, in order: "auto" from the inventory, or the declared ones checked against it."""
    if partitions == "auto":
        return _auto(inventory)
    return _Planner(inventory, trt_cache_dir).plan(partitions)


def _gpu_providers(memory_mb: int, tensorrt: bool, cache: Path) -> Providers:
    cuda = ("CUDAExecutionProvider", {"device_id": "0", "gpu_mem_limit": str(memory_mb * 2**20),
                                      "arena_extend_strategy": "kSameAsRequested"})
    if not tensorrt:
        return (cuda, *CPU_PROVIDERS)
    trt = ("TensorrtExecutionProvider", {"device_id": "0", "trt_engine_cache_enable": "True",
                                         "trt_engine_cache_path": str(cache)})
    return (trt, cuda, *CPU_PROVIDERS)


def _gpu_plan(name: str, device: str, kind: PartitionKind, gpu: Gpu, memory_mb: int, *, visible: str,
              compute_percent: int = 100, tensorrt: bool = False, trt_cache_dir: Path = Path()) -> PartitionPlan:
    env = {"CUDA_VISIBLE_DEVICES": visible}
    if kind != "mig":  # a MIG UUID names the device whatever the order
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if kind == "slice":
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(compute_percent)
    return PartitionPlan(name=name, device=device, kind=kind, memory_mb=memory_mb, compute_percent=compute_percent,
                         env=env, providers=_gpu_providers(memory_mb, tensorrt, trt_cache_dir / name),
                         intra_op_threads=GPU_INTRA_OP_THREADS, executors=GPU_EXECUTORS, max_batch=GPU_MAX_BATCH,
                         gpu_index=gpu.index)


def _cpu_plan(name: str, cores: Sequence[int], memory_mb: int) -> PartitionPlan:
    # one executor per core, sharing a session, each running it on its own thread (one intra-op thread): as
    # fast as one process per core, and faster under load than executors sharing a thread per core (measured
    # in docs/BENCHMARKS.md); a frame alone in the worker runs on every core (runtime.lone_frame_all_cores)
    return PartitionPlan(name=name, device="cpu", kind="cpu", cores=tuple(sorted(cores)), memory_mb=memory_mb,
                         intra_op_threads=1, executors=len(cores))  # = threads_for(len(cores))


def _auto(inv: Inventory) -> list[PartitionPlan]:
    plans: list[PartitionPlan] = []
    for gpu in inv.gpus:
        if gpu.mig_enabled:
            plans += [_gpu_plan(f"gpu{gpu.index}-mig{i}", f"mig:{m.uuid}", "mig", gpu, m.memory_mb, visible=m.uuid)
                      for i, m in enumerate(gpu.mig_devices)]
        else:
            plans.append(_gpu_plan(f"gpu{gpu.index}", f"cuda:{gpu.index}", "gpu", gpu, gpu.memory_mb,
                                   visible=str(gpu.index)))
    cores = inv.cpu_cores
    if plans and len(cores) > 2:
        cores = cores[MANAGEMENT_CORES:]
    plans.append(_cpu_plan("cpu", cores, inv.memory_mb))
    return plans


def _names(parts: Sequence[PartitionSettings]) -> str:
    return ", ".join(p.name for p in parts)


def _partitions(parts: Sequence[PartitionSettings]) -> str:
    """``partition a`` or ``partitions a, b``."""
    return ("partition " if len(parts) == 1 else "partitions ") + _names(parts)


def _verb(parts: Sequence[PartitionSettings], one: str, many: str) -> str:
    return one if len(parts) == 1 else many


def _cores_phrase(cores: Sequence[int]) -> str:
    return f"core {cores[0]}" if len(cores) == 1 else f"cores {format_cores(cores)}"


def _shares(total: int, asked: Sequence[int | None]) -> tuple[int, list[int]]:
    """What the explicit numbers add up to, and each entry's amount: its own, or an even share of what is left."""
    claimed = sum(a for a in asked if a is not None)
    open_count = sum(1 for a in asked if a is None)
    share = (total - claimed) // open_count if open_count else 0
    return claimed, [share if a is None else a for a in asked]


class _Planner:
    """Checks declared partitions against the inventory, collecting every problem before raising."""

    def __init__(self, inv: Inventory, trt_cache_dir: Path) -> None:
        self.inv = inv
        self.trt_cache_dir = trt_cache_dir
        self.problems: list[str] = []
        self.plans: dict[str, PartitionPlan] = {}

    def plan(self, partitions: list[PartitionSettings]) -> list[PartitionPlan]:
        if not partitions:
            self.problems.append('no partitions declared: declare at least one [[partitions]] or use partitions = '
                                 '"auto"')
        cpus: list[PartitionSettings] = []
        on_gpu: dict[int, list[PartitionSettings]] = {}
        on_mig: dict[str, list[PartitionSettings]] = {}
        for p in partitions:
            if p.device == "cpu":
                cpus.append(p)
            elif p.device.startswith("cuda:"):
                gpu = self.inv.gpu(int(p.device.removeprefix("cuda:")))
                if gpu is None:
                    self.problems.append(f"partition {p.name}: device {p.device} does not exist; this box has "
                                         f"{self._gpus_here()}")
                elif gpu.mig_enabled:
                    self.problems.append(f"partition {p.name}: {p.device} ({gpu.name}) is in MIG mode, so it cannot "
                                         f"be used whole or sliced; {self._mig_advice(gpu)}")
                else:
                    on_gpu.setdefault(gpu.index, []).append(p)
            else:
                uuid = p.device.removeprefix("mig:")
                if self.inv.mig_device(uuid) is None:
                    self.problems.append(f"partition {p.name}: device {p.device} does not exist; this box has "
                                         f"{self._migs_here()}")
                else:
                    on_mig.setdefault(uuid, []).append(p)
        self._cpus(cpus)
        for index, parts in on_gpu.items():
            gpu = self.inv.gpu(index)
            assert gpu is not None
            self._gpu(gpu, parts)
        for uuid, parts in on_mig.items():
            found = self.inv.mig_device(uuid)
            assert found is not None
            self._mig(*found, parts)
        if self.problems:
            raise PartitionError(self.problems)
        return [self.plans[p.name] for p in partitions]

    def _gpus_here(self) -> str:
        if not self.inv.gpus:
            return f"no NVIDIA GPU ({self.inv.nvml_error or 'NVML lists none'})"
        return ", ".join(f"cuda:{g.index} ({g.name}{', MIG mode' if g.mig_enabled else ''})" for g in self.inv.gpus)

    def _migs_here(self) -> str:
        migs = [f"mig:{m.uuid} ({m.profile} on cuda:{g.index})" for g in self.inv.gpus for m in g.mig_devices]
        if migs:
            return ", ".join(migs)
        return "no MIG instances" if self.inv.gpus else f"no NVIDIA GPU ({self.inv.nvml_error or 'NVML lists none'})"

    @staticmethod
    def _mig_advice(gpu: Gpu) -> str:
        if not gpu.mig_devices:
            return "it has no MIG instances yet: create some (nvidia-smi mig) or turn MIG mode off"
        return "use its MIG instances: " + ", ".join(f"mig:{m.uuid}" for m in gpu.mig_devices)

    def _cpus(self, parts: list[PartitionSettings]) -> None:
        allowed = set(self.inv.cpu_cores)
        listed = [p for p in parts if p.cores is not None]
        for p in listed:
            assert p.cores is not None
            bad = sorted(set(p.cores) - allowed)
            if bad:
                verb = "does not exist or is not allowed" if len(bad) == 1 else "do not exist or are not allowed"
                self.problems.append(f"partition {p.name}: {_cores_phrase(bad)} {verb} for this process "
                                     f"(it may use {format_cores(self.inv.cpu_cores) or 'none'})")
        for i, a in enumerate(listed):
            for b in listed[i + 1:]:
                common = sorted(set(a.cores or ()) & set(b.cores or ()))
                if common:
                    self.problems.append(f"partitions {a.name} and {b.name} both use {_cores_phrase(common)}")
        used = {c for p in listed for c in p.cores or ()}
        left = sorted(allowed - used)
        unlisted = [p for p in parts if p.cores is None]
        if len(unlisted) > 1:
            self.problems.append(f"partitions {_names(unlisted)} all take the cores left over; list cores for all "
                                 "but one of them")
        elif unlisted and not left and listed:
            self.problems.append(f"partition {unlisted[0].name} has no CPU cores left: {_partitions(listed)} "
                                 f"{_verb(listed, 'uses', 'use')} all of {format_cores(self.inv.cpu_cores)}")
        elif unlisted and not left:
            self.problems.append(f"partition {unlisted[0].name} has no CPU cores: this process may use none")
        asked = [p for p in parts if p.memory_mb is not None]
        claimed, memory = _shares(self.inv.memory_mb, [p.memory_mb for p in parts])
        if claimed > self.inv.memory_mb:
            self.problems.append(f"{_partitions(asked)} (cpu) {_verb(asked, 'asks', 'ask')} for "
                                 f"{claimed} MB, the host has {self.inv.memory_mb} MB")
        elif len(asked) < len(parts) and min(memory) < 1:
            open_ = [p for p in parts if p.memory_mb is None]
            self.problems.append(f"{_partitions(open_)} (cpu) {_verb(open_, 'has', 'have')} no host memory left: "
                                 f"{_partitions(asked)} {_verb(asked, 'asks', 'ask')} for all {self.inv.memory_mb} MB")
        for p, mb in zip(parts, memory):
            self.plans[p.name] = _cpu_plan(p.name, p.cores if p.cores is not None else left, mb)

    def _gpu(self, gpu: Gpu, parts: list[PartitionSettings]) -> None:
        where = f"cuda:{gpu.index}"
        whole = [p for p in parts if p.memory_mb is None and p.compute_percent is None]
        slices = [p for p in parts if p not in whole]
        if len(whole) > 1:
            self.problems.append(f"partitions {_names(whole)} all take the whole of {where} ({gpu.name}); give each "
                                 "a memory_mb or compute_percent to share it")
        elif whole and slices:
            self.problems.append(f"partition {whole[0].name} takes the whole of {where} ({gpu.name}), so "
                                 f"{_partitions(slices)} cannot share it; give {whole[0].name} a memory_mb or "
                                 "compute_percent to make it a slice too")
        for p in whole:
            self.plans[p.name] = _gpu_plan(p.name, p.device, "gpu", gpu, gpu.memory_mb, visible=str(gpu.index),
                                           tensorrt=p.tensorrt, trt_cache_dir=self.trt_cache_dir)
        if not slices:
            return
        memory = self._memory(slices, gpu.memory_mb, f"on {where}", "the GPU")
        claimed, compute = _shares(100, [p.compute_percent for p in slices])
        asked = [p for p in slices if p.compute_percent is not None]
        if claimed > 100:
            self.problems.append(f"{_partitions(asked)} on {where} {_verb(asked, 'asks', 'ask')} for "
                                 f"{claimed}% of its compute, more than 100%")
        elif len(asked) < len(slices) and min(compute) < 1:
            open_ = [p for p in slices if p.compute_percent is None]
            self.problems.append(f"{_partitions(open_)} on {where} {_verb(open_, 'has', 'have')} no "
                                 f"compute left: {_partitions(asked)} {_verb(asked, 'asks', 'ask')} for all 100%")
        for p, mb, percent in zip(slices, memory, compute):
            self.plans[p.name] = _gpu_plan(p.name, p.device, "slice", gpu, mb, visible=str(gpu.index),
                                           compute_percent=percent, tensorrt=p.tensorrt,
                                           trt_cache_dir=self.trt_cache_dir)

    def _mig(self, gpu: Gpu, mig: MigDevice, parts: list[PartitionSettings]) -> None:
        memory = self._memory(parts, mig.memory_mb, f"on mig:{mig.uuid}", f"the MIG instance ({mig.profile})")
        for p, mb in zip(parts, memory):
            self.plans[p.name] = _gpu_plan(p.name, p.device, "mig", gpu, mb, visible=mig.uuid, tensorrt=p.tensorrt,
                                           trt_cache_dir=self.trt_cache_dir)

    def _memory(self, parts: list[PartitionSettings], total: int, where: str, has: str) -> list[int]:
        """Each partition's memory on one device; reports asking for more than it has."""
        claimed, memory = _shares(total, [p.memory_mb for p in parts])
        asked = [p for p in parts if p.memory_mb is not None]
        if claimed > total:
            self.problems.append(f"{_partitions(asked)} {where} {_verb(asked, 'asks', 'ask')} for "
                                 f"{claimed} MB, {has} has {total} MB")
        elif len(asked) < len(parts) and min(memory) < 1:
            open_ = [p for p in parts if p.memory_mb is None]
            self.problems.append(f"{_partitions(open_)} {where} {_verb(open_, 'has', 'have')} no memory "
                                 f"left: {_partitions(asked)} {_verb(asked, 'asks', 'ask')} for all {total} MB")
        return [max(mb, 0) for mb in memory]
