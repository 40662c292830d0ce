"""Inventory and partition plans: recorded NVML inventories, this machine's real CPUs, real ONNX Runtime sessions."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ConfigError
from appliance.runtime.inventory import (
    Gpu,
    Inventory,
    MigDevice,
    NvmlUnavailable,
    PynvmlReader,
    RecordedReader,
    format_inventory,
    mig_profile_from_name,
    read_inventory,
)
from appliance.runtime.partitions import (
    GPU_EXECUTORS,
    GPU_INTRA_OP_THREADS,
    PartitionError,
    PartitionPlan,
    plan_partitions,
    session_providers,
)
from appliance.settings import PartitionSettings

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"
TRT = Path("/var/lib/appliance/tensorrt-cache")
HAS_NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()
MiB = 2**20


def inventory(name: str) -> Inventory:
    return read_inventory(FIXTURES / name)


def declared(inv: Inventory, *parts: dict[str, Any], trt: Path = TRT) -> list[PartitionPlan]:
    return plan_partitions([PartitionSettings(**p) for p in parts], inv, trt)


def refusal(inv: Inventory, *parts: dict[str, Any]) -> PartitionError:
    with pytest.raises(PartitionError) as info:
        declared(inv, *parts)
    return info.value


def cuda(plan: PartitionPlan) -> dict[str, str]:
    return dict(plan.providers)["CUDAExecutionProvider"]


# --- auto plans from the recorded inventories


def test_auto_on_h100_with_seven_mig_instances() -> None:
    inv = inventory("h100-mig7.json")
    plans = plan_partitions("auto", inv, TRT)
    migs = inv.gpus[0].mig_devices
    assert [p.name for p in plans] == [f"gpu0-mig{i}" for i in range(7)] + ["cpu"]
    assert [p.kind for p in plans] == ["mig"] * 7 + ["cpu"]
    for plan, mig in zip(plans, migs):
        assert plan.device == f"mig:{mig.uuid}" and mig.uuid.startswith("MIG-")
        assert plan.env == {"CUDA_VISIBLE_DEVICES": mig.uuid}, "a MIG instance is named by its UUID"
        assert plan.memory_mb == 9984 and plan.compute_percent == 100 and plan.cores == ()
        assert plan.providers == (
            ("CUDAExecutionProvider", {"device_id": "0", "gpu_mem_limit": str(9984 * MiB),
                                       "arena_extend_strategy": "kSameAsRequested"}),
            ("CPUExecutionProvider", {}),
        )
        assert plan.expected_provider == "CUDAExecutionProvider"
        assert plan.intra_op_threads == GPU_INTRA_OP_THREADS and plan.gpu_index == 0
        assert plan.executors == GPU_EXECUTORS, "host decode of one frame overlaps the device's run of another"
    assert len({p.env["CUDA_VISIBLE_DEVICES"] for p in plans[:7]}) == 7
    cpu = plans[-1]
    assert cpu.cores == tuple(range(1, 16)), "core 0 is left to the management plane"
    assert (cpu.executors, cpu.intra_op_threads) == (15, 1) and cpu.memory_mb == inv.memory_mb == 257560
    assert cpu.env == {} and cpu.providers == (("CPUExecutionProvider", {}),)
    assert cpu.expected_provider == "CPUExecutionProvider"


def test_auto_on_a_single_t4() -> None:
    gpu0, cpu = plan_partitions("auto", inventory("t4-single.json"), TRT)
    assert (gpu0.name, gpu0.device, gpu0.kind, gpu0.memory_mb) == ("gpu0", "cuda:0", "gpu", 15360)
    assert gpu0.env == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert cuda(gpu0) == {"device_id": "0", "gpu_mem_limit": str(15360 * MiB),
                          "arena_extend_strategy": "kSameAsRequested"}
    assert [n for n, _ in gpu0.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (cpu.name, cpu.kind, cpu.cores, cpu.memory_mb) == ("cpu", "cpu", (1, 2, 3, 4, 5, 6, 7), 31890)


def test_auto_on_a_box_without_gpu_uses_every_core() -> None:
    [cpu] = plan_partitions("auto", inventory("cpu-only.json"), TRT)
    assert (cpu.name, cpu.device, cpu.kind, cpu.cores, cpu.memory_mb) == ("cpu", "cpu", "cpu", (0, 1), 3915)
    assert cpu.providers == (("CPUExecutionProvider", {}),) and cpu.env == {} and (cpu.executors, cpu.intra_op_threads) == (2, 1)


def test_fewer_executors_on_a_cpu_partition_share_its_cores_out() -> None:
    """One executor per core by default, each running its frame on its own core; an operator who sets fewer
    executors (runtime.executors) still gets every core, as intra-op threads."""
    [cpu] = plan_partitions("auto", inventory("cpu-only.json"), TRT)
    assert cpu.threads_for(cpu.executors) == 1
    assert cpu.threads_for(1) == 2
    gpu0, _ = plan_partitions("auto", inventory("t4-single.json"), TRT)
    assert gpu0.threads_for(1) == gpu0.threads_for(4) == GPU_INTRA_OP_THREADS


def test_auto_on_two_gpus_gives_each_its_own_index() -> None:
    gpu0, gpu1, cpu = plan_partitions("auto", inventory("two-gpus.json"), TRT)
    assert (gpu0.name, gpu1.name) == ("gpu0", "gpu1")
    assert gpu0.env["CUDA_VISIBLE_DEVICES"] == "0" and gpu1.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert cuda(gpu0)["device_id"] == cuda(gpu1)["device_id"] == "0", "each worker sees its one GPU as device 0"
    assert cuda(gpu1)["gpu_mem_limit"] == str(23034 * MiB) and gpu1.gpu_index == 1
    assert cpu.cores == tuple(range(1, 32))


def test_auto_keeps_no_management_core_on_a_two_core_box_with_a_gpu() -> None:
    inv = replace(inventory("t4-single.json"), cpu_cores=(0, 1))
    assert plan_partitions("auto", inv, TRT)[-1].cores == (0, 1)


def test_auto_with_this_machines_cpus_and_recorded_gpus() -> None:
    inv = read_inventory(nvml=RecordedReader(FIXTURES / "h100-mig7.json"))
    cores = tuple(sorted(os.sched_getaffinity(0)))
    assert inv.source == "system" and inv.cpu_cores == cores and inv.nvml_error is None
    plans = plan_partitions("auto", inv, TRT)
    assert [p.kind for p in plans] == ["mig"] * 7 + ["cpu"]
    assert plans[-1].cores == (cores[1:] if len(cores) > 2 else cores)


def test_recorded_reader_without_gpus_reports_why() -> None:
    inv = read_inventory(nvml=RecordedReader(FIXTURES / "cpu-only.json"))
    assert inv.gpus == () and inv.nvml_error is not None and "NVIDIA driver" in inv.nvml_error


# --- declared partitions


def test_soft_slices_on_a_t4() -> None:
    a, b, c, d = declared(
        inventory("t4-single.json"),
        {"name": "a", "device": "cuda:0", "memory_mb": 4096, "compute_percent": 30},
        {"name": "b", "device": "cuda:0", "memory_mb": 8192, "compute_percent": 50},
        {"name": "c", "device": "cuda:0", "compute_percent": 20},
        {"name": "d", "device": "cpu", "cores": [2, 3]},
    )
    assert [p.kind for p in (a, b, c, d)] == ["slice", "slice", "slice", "cpu"]
    assert a.env == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                     "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert b.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50" and c.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "20"
    assert (a.memory_mb, b.memory_mb, c.memory_mb) == (4096, 8192, 15360 - 4096 - 8192), "c gets what is left"
    assert (a.compute_percent, b.compute_percent, c.compute_percent) == (30, 50, 20)
    assert cuda(a) == {"device_id": "0", "gpu_mem_limit": str(4096 * MiB), "arena_extend_strategy": "kSameAsRequested"}
    assert cuda(b)["gpu_mem_limit"] == str(8192 * MiB) and cuda(c)["gpu_mem_limit"] == str(3072 * MiB)
    assert d.cores == (2, 3) and (d.executors, d.intra_op_threads) == (2, 1) and d.memory_mb == 31890


def test_slices_without_a_compute_share_split_what_is_left() -> None:
    a, b, c = declared(inventory("t4-single.json"),
                       {"name": "a", "device": "cuda:0", "memory_mb": 2000, "compute_percent": 40},
                       {"name": "b", "device": "cuda:0", "memory_mb": 2000},
                       {"name": "c", "device": "cuda:0", "memory_mb": 2000})
    assert (a.compute_percent, b.compute_percent, c.compute_percent) == (40, 30, 30)
    assert c.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"


def test_tensorrt_comes_first_with_an_engine_cache_per_partition(tmp_path: Path) -> None:
    [plan] = declared(inventory("two-gpus.json"), {"name": "fast", "device": "cuda:1", "tensorrt": True},
                      trt=tmp_path / "tensorrt-cache")
    cache = tmp_path / "tensorrt-cache" / "fast"
    assert plan.providers == (
        ("TensorrtExecutionProvider", {"device_id": "0", "trt_engine_cache_enable": "True",
                                       "trt_engine_cache_path": str(cache)}),
        ("CUDAExecutionProvider", {"device_id": "0", "gpu_mem_limit": str(23034 * MiB),
                                   "arena_extend_strategy": "kSameAsRequested"}),
        ("CPUExecutionProvider", {}),
    )
    assert plan.expected_provider == "TensorrtExecutionProvider" and plan.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert not cache.exists(), "planning has no side effects"
    providers = session_providers(plan)
    assert cache.is_dir(), "the worker side creates the engine cache"
    assert providers == [(n, o) for n, o in plan.providers] and isinstance(providers, list)


def test_declared_mig_partitions_with_a_memory_cap() -> None:
    inv = inventory("h100-mig7.json")
    migs = inv.gpus[0].mig_devices
    a, b, c = declared(inv, {"name": "a", "device": f"mig:{migs[3].uuid}", "memory_mb": 4000},
                       {"name": "b", "device": f"mig:{migs[3].uuid}"},
                       {"name": "c", "device": f"mig:{migs[0].uuid}", "tensorrt": True})
    assert a.kind == b.kind == c.kind == "mig"
    assert a.env == b.env == {"CUDA_VISIBLE_DEVICES": migs[3].uuid}
    assert (a.memory_mb, b.memory_mb, c.memory_mb) == (4000, 9984 - 4000, 9984)
    assert cuda(a)["gpu_mem_limit"] == str(4000 * MiB)
    assert c.expected_provider == "TensorrtExecutionProvider" and c.env == {"CUDA_VISIBLE_DEVICES": migs[0].uuid}


def test_a_cpu_partition_without_cores_gets_the_rest() -> None:
    a, b, g = declared(inventory("t4-single.json"), {"name": "a", "device": "cpu", "cores": [0, 1], "memory_mb": 1000},
                       {"name": "b", "device": "cpu"}, {"name": "g", "device": "cuda:0"})
    assert a.cores == (0, 1) and a.memory_mb == 1000
    assert b.cores == (2, 3, 4, 5, 6, 7) and (b.executors, b.intra_op_threads) == (6, 1) and b.memory_mb == 31890 - 1000
    assert g.kind == "gpu" and g.memory_mb == 15360 and g.cores == ()


# --- refusals: every message names the partitions and the numbers


def test_unknown_gpu() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "p2", "device": "cuda:3"})
    assert str(e) == "partition p2: device cuda:3 does not exist; this box has cuda:0 (Tesla T4)"
    assert isinstance(e, ConfigError) and e.problems == (str(e),)


def test_gpu_on_a_box_without_one_says_why() -> None:
    e = refusal(inventory("cpu-only.json"), {"name": "g", "device": "cuda:0"})
    assert str(e) == ("partition g: device cuda:0 does not exist; this box has no NVIDIA GPU (no NVIDIA driver is "
                      "installed: the NVML library libnvidia-ml.so.1 was not found)")


def test_unknown_mig_instance() -> None:
    inv = inventory("h100-mig7.json")
    e = refusal(inv, {"name": "m", "device": "mig:MIG-00000000-0000-0000-0000-000000000000"})
    first = inv.gpus[0].mig_devices[0].uuid
    assert str(e).startswith("partition m: device mig:MIG-00000000-0000-0000-0000-000000000000 does not exist; "
                             f"this box has mig:{first} (1g.10gb on cuda:0), ")
    e = refusal(inventory("t4-single.json"), {"name": "m", "device": "mig:MIG-00000000-0000-0000-0000-000000000000"})
    assert str(e).endswith("does not exist; this box has no MIG instances")


def test_whole_gpu_in_mig_mode() -> None:
    inv = inventory("h100-mig7.json")
    e = refusal(inv, {"name": "whole", "device": "cuda:0"}, {"name": "half", "device": "cuda:0", "memory_mb": 40000})
    uuids = ", ".join(f"mig:{m.uuid}" for m in inv.gpus[0].mig_devices)
    why = "cuda:0 (NVIDIA H100 80GB HBM3) is in MIG mode, so it cannot be used whole or sliced; use its MIG instances: "
    assert e.problems == (f"partition whole: {why}{uuids}", f"partition half: {why}{uuids}")


def test_cores_that_do_not_exist() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "a", "device": "cpu", "cores": [6, 7, 8, 9]})
    assert str(e) == "partition a: cores 8-9 do not exist or are not allowed for this process (it may use 0-7)"
    e = refusal(inventory("t4-single.json"), {"name": "a", "device": "cpu", "cores": [64]})
    assert str(e) == "partition a: core 64 does not exist or is not allowed for this process (it may use 0-7)"


def test_cores_not_allowed_for_this_process() -> None:
    inv = read_inventory()
    outside = max(os.sched_getaffinity(0)) + 1
    e = refusal(inv, {"name": "a", "device": "cpu", "cores": [outside]})
    assert f"partition a: core {outside} does not exist or is not allowed for this process" in str(e)


def test_overlapping_cores() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "a", "device": "cpu", "cores": [0, 1]},
                {"name": "b", "device": "cpu", "cores": [1, 2]})
    assert str(e) == "partitions a and b both use core 1"
    e = refusal(inventory("t4-single.json"), {"name": "a", "device": "cpu", "cores": [0, 1, 2, 3]},
                {"name": "b", "device": "cpu", "cores": [1, 2, 3, 5]})
    assert str(e) == "partitions a and b both use cores 1-3"


def test_gpu_memory_over_committed() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "p1", "device": "cuda:0", "memory_mb": 12000},
                {"name": "p2", "device": "cuda:0", "memory_mb": 8000})
    assert str(e) == "partitions p1, p2 on cuda:0 ask for 20000 MB, the GPU has 15360 MB"
    e = refusal(inventory("t4-single.json"), {"name": "p1", "device": "cuda:0", "memory_mb": 16000})
    assert str(e) == "partition p1 on cuda:0 asks for 16000 MB, the GPU has 15360 MB"


def test_gpu_memory_all_taken_leaves_nothing_for_a_slice_without_a_cap() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "p1", "device": "cuda:0", "memory_mb": 15360},
                {"name": "p2", "device": "cuda:0", "compute_percent": 10})
    assert str(e) == "partition p2 on cuda:0 has no memory left: partition p1 asks for all 15360 MB"


def test_mig_memory_over_committed() -> None:
    uuid = inventory("h100-mig7.json").gpus[0].mig_devices[2].uuid
    e = refusal(inventory("h100-mig7.json"), {"name": "m", "device": f"mig:{uuid}", "memory_mb": 12000})
    assert str(e) == f"partition m on mig:{uuid} asks for 12000 MB, the MIG instance (1g.10gb) has 9984 MB"


def test_compute_over_committed() -> None:
    e = refusal(inventory("t4-single.json"),
                {"name": "s1", "device": "cuda:0", "memory_mb": 4000, "compute_percent": 80},
                {"name": "s2", "device": "cuda:0", "memory_mb": 4000, "compute_percent": 50})
    assert str(e) == "partitions s1, s2 on cuda:0 ask for 130% of its compute, more than 100%"
    e = refusal(inventory("t4-single.json"), {"name": "s1", "device": "cuda:0", "compute_percent": 100},
                {"name": "s2", "device": "cuda:0", "memory_mb": 4000})
    assert str(e) == "partition s2 on cuda:0 has no compute left: partition s1 asks for all 100%"


def test_whole_gpu_and_a_slice_on_the_same_gpu() -> None:
    e = refusal(inventory("t4-single.json"), {"name": "g", "device": "cuda:0"},
                {"name": "s", "device": "cuda:0", "memory_mb": 4096})
    assert str(e) == ("partition g takes the whole of cuda:0 (Tesla T4), so partition s cannot share it; "
                      "give g a memory_mb or compute_percent to make it a slice too")
    e = refusal(inventory("t4-single.json"), {"name": "g", "device": "cuda:0"}, {"name": "h", "device": "cuda:0"})
    assert str(e) == ("partitions g, h all take the whole of cuda:0 (Tesla T4); give each a memory_mb or "
                      "compute_percent to share it")


def test_cpu_partition_with_no_cores_left() -> None:
    e = refusal(inventory("cpu-only.json"), {"name": "a", "device": "cpu", "cores": [0, 1]},
                {"name": "b", "device": "cpu"})
    assert str(e) == "partition b has no CPU cores left: partition a uses all of 0-1"
    e = refusal(inventory("cpu-only.json"), {"name": "a", "device": "cpu"}, {"name": "b", "device": "cpu"})
    assert str(e) == "partitions a, b all take the cores left over; list cores for all but one of them"


def test_host_memory_over_committed() -> None:
    e = refusal(inventory("cpu-only.json"), {"name": "a", "device": "cpu", "cores": [0], "memory_mb": 3000},
                {"name": "b", "device": "cpu", "cores": [1], "memory_mb": 2000})
    assert str(e) == "partitions a, b (cpu) ask for 5000 MB, the host has 3915 MB"


def test_no_partitions_declared() -> None:
    e = refusal(inventory("cpu-only.json"))
    assert str(e) == 'no partitions declared: declare at least one [[partitions]] or use partitions = "auto"'


def test_several_problems_are_reported_together() -> None:
    e = refusal(inventory("t4-single.json"),
                {"name": "p1", "device": "cuda:0", "memory_mb": 12000},
                {"name": "p2", "device": "cuda:0", "memory_mb": 8000},
                {"name": "p3", "device": "cuda:3"},
                {"name": "a", "device": "cpu", "cores": [0, 1]},
                {"name": "b", "device": "cpu", "cores": [1, 9]})
    assert e.problems == (
        "partition p3: device cuda:3 does not exist; this box has cuda:0 (Tesla T4)",
        "partition b: core 9 does not exist or is not allowed for this process (it may use 0-7)",
        "partitions a and b both use core 1",
        "partitions p1, p2 on cuda:0 ask for 20000 MB, the GPU has 15360 MB",
    )
    assert str(e) == "4 problems with the partitions:\n  - " + "\n  - ".join(e.problems)
    copy = pickle.loads(pickle.dumps(e))
    assert isinstance(copy, PartitionError) and copy.problems == e.problems and str(copy) == str(e)


# --- this machine, through the real NVML reader


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="this machine has an NVIDIA driver")
def test_system_inventory_on_this_gpu_less_machine() -> None:
    pytest.importorskip("pynvml")
    with pytest.raises(NvmlUnavailable, match="NVIDIA driver"):
        PynvmlReader().gpus()
    inv = read_inventory()
    assert inv.source == "system" and inv.gpus == ()
    assert inv.cpu_cores == tuple(sorted(os.sched_getaffinity(0))) and len(inv.cpu_cores) >= 1
    assert inv.memory_mb > 0
    assert inv.nvml_error == "no NVIDIA driver is installed: the NVML library libnvidia-ml.so.1 was not found"
    assert f"no NVIDIA GPU found ({inv.nvml_error})" in format_inventory(inv)
    [cpu] = plan_partitions("auto", inv, TRT)
    assert cpu.cores == inv.cpu_cores and cpu.memory_mb == inv.memory_mb


@pytest.mark.skipif(not HAS_NVIDIA_DRIVER, reason="needs an NVIDIA driver")
def test_system_inventory_with_a_driver() -> None:
    inv = read_inventory()
    assert inv.nvml_error is None and inv.gpus, "a driver without GPUs or NVML"
    for g in inv.gpus:
        assert g.uuid.startswith("GPU-") and g.memory_mb > 0
        assert all(m.uuid.startswith("MIG-") and m.memory_mb > 0 for m in g.mig_devices)
    assert plan_partitions("auto", inv, TRT)


def test_mig_profile_from_the_mig_device_name() -> None:
    assert mig_profile_from_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb") == "1g.10gb"
    assert mig_profile_from_name("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb") == "1c.3g.20gb"
    assert mig_profile_from_name("Tesla T4") is None


# --- the text and JSON forms


def test_format_inventory_of_the_h100() -> None:
    inv = inventory("h100-mig7.json")
    gpu = inv.gpus[0]
    assert format_inventory(inv) == "\n".join([
        f"inventory: file:{FIXTURES / 'h100-mig7.json'}",
        "CPU: 16 cores (0-15)",
        "memory: 257560 MB",
        f"cuda:0 NVIDIA H100 80GB HBM3: 81559 MB, MIG on  {gpu.uuid}",
        *[f"  mig:{m.uuid}  1g.10gb    9984 MB" for m in gpu.mig_devices],
    ])


def test_format_inventory_without_mig() -> None:
    text = format_inventory(inventory("two-gpus.json"))
    assert "CPU: 32 cores (0-31)" in text
    assert "cuda:0 NVIDIA L4: 23034 MB, MIG off" in text and "cuda:1 NVIDIA L4: 23034 MB, MIG off" in text
    assert "mig:" not in text


@pytest.mark.parametrize("name", ["h100-mig7.json", "t4-single.json", "cpu-only.json", "two-gpus.json"])
def test_json_round_trip(name: str) -> None:
    inv = inventory(name)
    assert Inventory.from_json(json.loads(json.dumps(inv.to_json()))) == inv
    assert inv.source == f"file:{FIXTURES / name}"


def test_json_round_trip_of_a_built_inventory() -> None:
    inv = Inventory(cpu_cores=(0, 2), memory_mb=1024, source="system", nvml_error=None, gpus=(
        Gpu(0, "GPU-a", "NVIDIA A100-SXM4-40GB", 40960, True, (MigDevice("MIG-b", "3g.20gb", 19968),)),))
    assert Inventory.from_json(json.loads(json.dumps(inv.to_json()))) == inv


def test_a_bad_inventory_file_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "h100-mig7.json").read_text())
    data["gpus"][0]["mig_devices"][2]["memory_mb"] = "10gb"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad.json: gpus\[0\].mig_devices\[2\].memory_mb: expected a non-negative"):
        read_inventory(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_inventory(tmp_path / "missing.json")


# --- the plans' providers in real ONNX Runtime sessions


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from appliance.demo.modelgen import build_classifier

    return (build_classifier(tmp_path_factory.mktemp("classifier")) / "model.onnx").read_bytes()


def session(model: bytes, plan: PartitionPlan) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the CUDA provider's load failure below is expected
    options.intra_op_num_threads = plan.intra_op_threads
    return ort.InferenceSession(model, sess_options=options, providers=session_providers(plan))


def test_a_cpu_plan_runs_on_the_cpu(model: bytes) -> None:
    plan = plan_partitions("auto", read_inventory(), TRT)[-1]
    assert session(model, plan).get_providers() == [plan.expected_provider] == ["CPUExecutionProvider"]


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="this machine has an NVIDIA driver")
def test_a_gpu_plan_on_a_machine_without_gpu_falls_back_to_the_cpu(model: bytes) -> None:
    """The error state the daemon surfaces: ONNX Runtime silently runs on the CPU instead."""
    plan = plan_partitions("auto", inventory("t4-single.json"), TRT)[0]
    providers = session(model, plan).get_providers()
    assert plan.expected_provider == "CUDAExecutionProvider"
    assert providers[0] != plan.expected_provider and providers == ["CPUExecutionProvider"]
