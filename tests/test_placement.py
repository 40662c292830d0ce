"""Placement: first-fit-decreasing packing, refusals with numbers, stability, model sharing, admission and swaps."""

from __future__ import annotations

import copy
import pickle
import random

import pytest

from appliance.errors import ApplianceError
from appliance.runtime.placement import AdmissionError, Bin, Demand, Placement, admit, admit_swap, place

GPU = Bin("gpu0", "gpu", 16384)
CPU = Bin("cpu", "cpu", 8192)


def test_packs_largest_first_into_the_first_partition_with_room() -> None:
    bins = [Bin("gpu0", "gpu", 4096), Bin("gpu1", "gpu", 4096), CPU]
    demands = [
        Demand("a", "a@1", 1000),
        Demand("b", "b@1", 3000),
        Demand("c", "c@1", 2500),
        Demand("d", "d@1", 1000),
        Demand("e", "e@1", 4000),
    ]
    p = place(demands, bins)
    # e 4000 -> gpu0 (full); b 3000 -> gpu1; c 2500 fits no GPU -> cpu; a, d 1000 -> gpu1 (1096 free), then cpu
    assert p.assignments == {"a": "gpu1", "b": "gpu1", "c": "cpu", "d": "cpu", "e": "gpu0"}
    assert p.refused == {}
    assert p.usage["gpu0"].memory_used_mb == 4000 and p.usage["gpu0"].memory_free_mb == 96
    assert p.usage["gpu1"].memory_free_mb == 96
    assert p.usage["cpu"].memory_used_mb == 3500 and p.usage["cpu"].memory_free_mb == 4692
    assert p.usage["gpu1"].apps == ("a", "b") and p.usage["gpu1"].models == {"a@1": 1000, "b@1": 3000}


def test_refusal_names_every_partition_and_the_numbers() -> None:
    bins = [Bin("gpu0", "gpu", 16384), Bin("cpu", "cpu", 4096)]
    p = place([Demand("big", "big@1", 15360), Demand("next", "next@1", 5000)], bins)
    assert p.assignments == {"big": "gpu0"}
    assert p.refused == {
        "next": "needs 5000 MB, gpu0 has 1024 MB free (of 16384 MB), cpu has 4096 MB free (of 4096 MB)"
    }


def test_pinned_app_to_a_full_partition_is_refused_even_with_room_elsewhere() -> None:
    bins = [Bin("p1", "gpu", 4096), GPU]
    p = place([Demand("resident", "r@1", 3584, pin="p1"), Demand("late", "l@1", 2048, pin="p1")], bins)
    assert p.assignments == {"resident": "p1"}
    assert p.refused == {"late": "pinned to p1, which has 512 MB free of 4096 MB; needs 2048 MB"}


def test_pinned_apps_are_placed_before_larger_unpinned_ones() -> None:
    bins = [Bin("p1", "gpu", 4096)]
    p = place([Demand("big", "b@1", 3000), Demand("pinned", "p@1", 2000, pin="p1")], bins)
    assert p.assignments == {"pinned": "p1"}
    assert p.refused["big"] == "needs 3000 MB, p1 has 2096 MB free (of 4096 MB)"


def test_pin_to_a_partition_that_does_not_exist() -> None:
    p = place([Demand("ppe", "ppe@1", 100, pin="p9")], [CPU, GPU])
    assert p.refused == {"ppe": "pinned to p9, which does not exist (partitions: cpu, gpu0)"}
    assert p.assignments == {}


def test_a_shared_model_is_counted_once_per_partition() -> None:
    bins = [Bin("gpu0", "gpu", 2048)]
    demands = [Demand(f"cam{i}", "yolo@8", 1500, compute_percent=10) for i in range(3)]
    p = place(demands, bins)
    assert p.refused == {}
    assert set(p.assignments.values()) == {"gpu0"}
    usage = p.usage["gpu0"]
    assert (usage.memory_used_mb, usage.memory_free_mb, usage.compute_used_percent) == (1500, 548, 30)
    assert usage.models == {"yolo@8": 1500} and usage.apps == ("cam0", "cam1", "cam2")


def test_an_app_follows_its_model_to_the_partition_that_already_holds_it() -> None:
    bins = [Bin("gpu0", "gpu", 8192), Bin("gpu1", "gpu", 8192)]
    first = place([Demand("a", "det@1", 1000, pin="gpu1")], bins)
    p = place([Demand("a", "det@1", 1000, pin="gpu1"), Demand("b", "det@1", 1000)], bins, first.assignments)
    assert p.assignments == {"a": "gpu1", "b": "gpu1"}
    assert p.usage["gpu1"].memory_used_mb == 1000 and p.usage["gpu0"].memory_used_mb == 0


def test_a_larger_estimate_for_a_shared_model_costs_only_the_difference() -> None:
    bins = [Bin("gpu0", "gpu", 1200)]
    p = place([Demand("a", "m@1", 1000), Demand("b", "m@1", 1100)], bins)
    assert p.usage["gpu0"].memory_used_mb == 1100 and p.usage["gpu0"].models == {"m@1": 1100}
    refused = place([Demand("a", "m@1", 1000, pin="gpu0"), Demand("b", "m@1", 1300, pin="gpu0")], bins, {"a": "gpu0"})
    assert refused.refused == {"b": "pinned to gpu0, which has 200 MB free of 1200 MB; needs 300 MB more "
                                    "(m@1 is loaded there)"}


def test_adding_an_app_keeps_current_assignments() -> None:
    bins = [Bin("gpu0", "gpu", 4096), Bin("gpu1", "gpu", 4096)]
    small = [Demand("a", "a@1", 1000), Demand("b", "b@1", 1000)]
    before = place(small, bins)
    assert before.assignments == {"a": "gpu0", "b": "gpu0"}
    # From scratch FFD would put the big one on gpu0 and push a and b over to gpu1; with current they stay.
    big = Demand("c", "c@1", 3500)
    assert place([*small, big], bins).assignments == {"a": "gpu1", "b": "gpu1", "c": "gpu0"}
    after = place([*small, big], bins, before.assignments)
    assert after.assignments == {"a": "gpu0", "b": "gpu0", "c": "gpu1"}
    assert after.moved == {}


def test_an_app_that_no_longer_fits_where_it_was_moves_and_is_reported() -> None:
    current = {"a": "gpu0", "b": "gpu0"}
    p = place([Demand("a", "a@1", 3000), Demand("b", "b@1", 3000)], [Bin("gpu0", "gpu", 4096), CPU], current)
    assert p.assignments == {"a": "gpu0", "b": "cpu"}
    assert p.moved == {"b": "gpu0"}


def test_a_pin_overrides_the_current_partition() -> None:
    p = place([Demand("a", "a@1", 100, pin="cpu")], [GPU, CPU], {"a": "gpu0"})
    assert p.assignments == {"a": "cpu"} and p.moved == {"a": "gpu0"}


def test_gpu_kinds_come_first_unless_the_app_prefers_cpu() -> None:
    bins = [CPU, Bin("mig-a", "mig", 5000), Bin("slice-b", "slice", 4000, compute_percent=50)]
    p = place([Demand("vision", "v@1", 500), Demand("gas", "g@1", 200, prefers_gpu=False)], bins)
    assert p.assignments == {"gas": "cpu", "vision": "mig-a"}
    # When the preferred kind is full, the other kind takes the app.
    p = place([Demand("gas", "g@1", 9000, prefers_gpu=False)], [CPU, Bin("gpu0", "gpu", 10000)])
    assert p.assignments == {"gas": "gpu0"}


def test_compute_over_the_slice_share_is_refused() -> None:
    bins = [Bin("s1", "slice", 8192, compute_percent=50)]
    p = place([Demand("a", "a@1", 100, compute_percent=30), Demand("b", "b@1", 100, compute_percent=30)], bins)
    assert p.assignments == {"a": "s1"}
    assert p.refused == {"b": "needs 100 MB and 30 % compute, s1 has 20 % compute free (of 50 %)"}
    pinned = place([Demand("c", "c@1", 9000, compute_percent=60, pin="s1")], bins)
    assert pinned.refused == {"c": "pinned to s1, which has 8192 MB free of 8192 MB and 50 % compute free of 50 %; "
                                   "needs 9000 MB and 60 % compute"}


def test_compute_adds_up_per_app_even_on_a_shared_model() -> None:
    bins = [Bin("gpu0", "gpu", 8192)]
    p = place([Demand(f"cam{i}", "yolo@8", 1000, compute_percent=40) for i in range(3)], bins)
    assert p.assignments == {"cam0": "gpu0", "cam1": "gpu0"}
    assert p.refused == {"cam2": "needs 1000 MB and 40 % compute, gpu0 has 20 % compute free (of 100 %)"}


def test_unlimited_memory_and_no_partitions() -> None:
    p = place([Demand("a", "a@1", 10**6)], [Bin("cpu", "cpu", None)])
    assert p.assignments == {"a": "cpu"} and p.usage["cpu"].memory_free_mb is None
    assert place([Demand("a", "a@1", 1)], []).refused == {"a": "no partitions are configured"}


def test_same_input_same_output_whatever_the_order_of_demands() -> None:
    bins = [Bin("gpu0", "gpu", 6000), Bin("s1", "slice", 3000, compute_percent=40), Bin("cpu", "cpu", 5000)]
    demands = [Demand(f"app{i}", f"m{i % 4}@1", 500 + 250 * (i % 5), compute_percent=5 * (i % 3),
                      prefers_gpu=i % 4 != 0) for i in range(16)]
    expected = place(demands, bins)
    rng = random.Random(7)
    for _ in range(10):
        shuffled = demands[:]
        rng.shuffle(shuffled)
        got = place(shuffled, bins)
        assert got == expected
        assert list(got.assignments) == list(expected.assignments)
        assert list(got.refused) == list(expected.refused)


def test_inputs_are_not_mutated() -> None:
    demands = [Demand("a", "a@1", 3000), Demand("b", "b@1", 3000), Demand("c", "c@1", 3000)]
    bins = [Bin("gpu0", "gpu", 4096), Bin("cpu", "cpu", 4096)]
    current = {"a": "gpu0", "b": "gpu0", "gone": "cpu"}
    snapshot = copy.deepcopy((demands, bins, current))
    place(demands, bins, current)
    with pytest.raises(AdmissionError):
        admit(Demand("d", "d@1", 3000), demands, bins, current)
    assert (demands, bins, current) == snapshot


def test_admit_returns_the_placement_with_the_new_app() -> None:
    existing = [Demand("a", "a@1", 1000), Demand("b", "b@1", 1000)]
    bins = [Bin("gpu0", "gpu", 4096), Bin("gpu1", "gpu", 4096)]
    current = place(existing, bins).assignments
    p = admit(Demand("c", "c@1", 3500), existing, bins, current)
    assert isinstance(p, Placement)
    assert p.assignments == {"a": "gpu0", "b": "gpu0", "c": "gpu1"}


def test_admit_refuses_what_does_not_fit_and_changes_nothing() -> None:
    existing = [Demand("a", "a@1", 3000)]
    bins = [Bin("gpu0", "gpu", 4096)]
    current = {"a": "gpu0"}
    with pytest.raises(AdmissionError) as caught:
        admit(Demand("b", "b@1", 2048), existing, bins, current)
    assert str(caught.value) == "cannot deploy b: needs 2048 MB, gpu0 has 1096 MB free (of 4096 MB)"
    assert isinstance(caught.value, ApplianceError)
    assert caught.value.app == "b" and caught.value.reason.startswith("needs 2048 MB")
    assert current == {"a": "gpu0"}
    restored = pickle.loads(pickle.dumps(caught.value))
    assert str(restored) == str(caught.value)


def test_admit_refuses_to_crowd_out_an_app_that_is_waiting_for_room() -> None:
    # "a" is installed but not placed yet (refused before); the new, bigger app would take the partition it fits in.
    existing = [Demand("a", "a@1", 3000)]
    bins = [Bin("gpu0", "gpu", 4096)]
    with pytest.raises(AdmissionError, match=r"^cannot deploy b: it would leave no room for a \(needs 3000 MB, gpu0 "
                                             r"has 496 MB free \(of 4096 MB\)\)$"):
        admit(Demand("b", "b@1", 3600), existing, bins, {})


def test_admit_of_an_upgrade_replaces_the_old_demand_and_may_move_only_the_upgraded_app() -> None:
    bins = [Bin("gpu0", "gpu", 4096), Bin("gpu1", "gpu", 4096)]
    existing = [Demand("a", "a@1", 1000), Demand("b", "b@1", 2000)]
    current = {"a": "gpu0", "b": "gpu0"}
    p = admit(Demand("a", "a@2", 3000), existing, bins, current)
    assert p.assignments == {"a": "gpu1", "b": "gpu0"}
    p = admit(Demand("a", "a@2", 2000), existing, bins, current)
    assert p.assignments == {"a": "gpu0", "b": "gpu0"}


def test_admit_swap_when_both_versions_fit() -> None:
    bins = [Bin("gpu0", "gpu", 2048)]
    old = Demand("ppe", "x@1", 800, compute_percent=20)
    new = Demand("ppe", "x@2", 900, compute_percent=25)
    other = Demand("fire", "f@1", 300)
    current = {"ppe": "gpu0", "fire": "gpu0"}
    p = admit_swap("ppe", old, new, [old, other], bins, current)
    assert p.assignments == {"fire": "gpu0", "ppe": "gpu0"}
    assert p.usage["gpu0"].models == {"f@1": 300, "x@2": 900}
    assert p.usage["gpu0"].compute_used_percent == 25


def test_admit_swap_refuses_when_the_partition_cannot_hold_both_versions() -> None:
    bins = [Bin("gpu0", "gpu", 1000), Bin("gpu1", "gpu", 16384)]
    old = Demand("ppe", "x@1", 600)
    new = Demand("ppe", "x@2", 300)
    current = {"ppe": "gpu0", "other": "gpu0"}
    existing = [old, Demand("other", "o@1", 300)]
    snapshot = copy.deepcopy((existing, current))
    with pytest.raises(AdmissionError) as caught:
        admit_swap("ppe", old, new, existing, bins, current)
    assert str(caught.value) == (
        "cannot deploy ppe: swapping ppe to model x@2 needs 300 MB more in gpu0, which has 100 MB free"
    )
    assert (existing, current) == snapshot
    # The same new version alone would fit there once the old one is gone: it is the overlap that does not.
    assert place([Demand("other", "o@1", 300), new], bins, current).assignments["ppe"] == "gpu0"


def test_admit_swap_refuses_extra_compute_in_a_slice() -> None:
    bins = [Bin("s1", "slice", 4096, compute_percent=50)]
    old = Demand("ppe", "x@1", 100, compute_percent=30)
    new = Demand("ppe", "x@2", 100, compute_percent=60)
    with pytest.raises(AdmissionError, match=r"needs 30 % compute more in s1, which has 20 % compute free$"):
        admit_swap("ppe", old, new, [old], bins, {"ppe": "s1"})


def test_admit_swap_of_an_app_that_is_not_placed_is_a_plain_admission() -> None:
    bins = [GPU]
    old = Demand("ppe", "x@1", 100)
    p = admit_swap("ppe", old, Demand("ppe", "x@2", 200), [], [GPU], {})
    assert p.assignments == {"ppe": "gpu0"} and bins == [GPU]


def test_invalid_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        Bin("x", "tpu", 1)
    with pytest.raises(ValueError, match="compute_percent must be 1 to 100"):
        Bin("x", "slice", 1, compute_percent=0)
    with pytest.raises(ValueError, match="memory_mb must not be negative"):
        Demand("a", "a@1", -1)
    with pytest.raises(ValueError, match="app a appears twice"):
        place([Demand("a", "a@1", 1), Demand("a", "b@1", 1)], [CPU])
    with pytest.raises(ValueError, match="partition cpu appears twice"):
        place([], [CPU, CPU])
    with pytest.raises(ValueError, match="both demands must be for ppe"):
        admit_swap("ppe", Demand("ppe", "x@1", 1), Demand("other", "x@2", 1), [], [CPU])
