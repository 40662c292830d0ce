"""Placement decisions on recorded machines: which partition each app of a site lands in, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.runtime.deploy import bins_for
from appliance.runtime.inventory import load_inventory_file
from appliance.runtime.partitions import plan_partitions
from appliance.runtime.placement import AdmissionError, Demand, admit, place

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"


def bins(fixture: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    plans = plan_partitions("auto", load_inventory_file(FIXTURES / fixture), tmp_path)
    return bins_for(plans)


def test_h100_with_seven_mig_instances_takes_one_5gb_model_per_instance(tmp_path: Path) -> None:
    b = bins("h100-mig7.json", tmp_path)
    demands = [Demand(f"app{i}", f"model{i}@1", 5000) for i in range(7)]
    placed = place(demands, b)
    assert not placed.refused
    assert sorted(placed.assignments.values()) == [f"gpu0-mig{i}" for i in range(7)], "one per MIG instance"
    with pytest.raises(AdmissionError, match=r"needs 6000 MB.*gpu0-mig0 has 4984 MB free \(of 9984 MB\)"):
        gpu_only = [x for x in b if x.kind != "cpu"]
        admit(Demand("eighth", "big@1", 6000), demands, gpu_only, placed.assignments)


def test_t4_takes_gpu_apps_and_cpu_apps_go_to_the_cores(tmp_path: Path) -> None:
    b = bins("t4-single.json", tmp_path)
    placed = place([Demand("ppe", "det@1", 900), Demand("gas", "anomaly@1", 50, prefers_gpu=False)], b)
    assert placed.assignments == {"gas": "cpu", "ppe": "gpu0"}


def test_two_apps_sharing_a_model_on_a_small_gpu_count_it_once(tmp_path: Path) -> None:
    b = bins("t4-single.json", tmp_path)
    placed = place([Demand("door", "det@1", 10000), Demand("yard", "det@1", 10000)], b)
    assert placed.assignments == {"door": "gpu0", "yard": "gpu0"}
    assert placed.usage["gpu0"].memory_used_mb == 10000


def test_cpu_only_box_places_everything_on_its_cores(tmp_path: Path) -> None:
    b = bins("cpu-only.json", tmp_path)
    placed = place([Demand("ppe", "det@1", 300), Demand("gas", "anomaly@1", 50)], b)
    assert set(placed.assignments.values()) == {"cpu"}


def test_two_gpus_spread_large_models(tmp_path: Path) -> None:
    b = bins("two-gpus.json", tmp_path)
    placed = place([Demand("a", "a@1", 15000), Demand("b", "b@1", 15000)], b)
    assert sorted(placed.assignments.values()) == ["gpu0", "gpu1"]
