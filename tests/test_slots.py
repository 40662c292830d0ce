from __future__ import annotations

from appliance.ingest.slots import LatestSlots


def test_latest_frame_wins_and_the_older_one_is_returned_for_counting() -> None:
    slots: LatestSlots[int] = LatestSlots()
    assert slots.put("cam1", 1) is None
    assert slots.put("cam1", 2) == 1
    assert slots.take() == ("cam1", 2)
    assert slots.take() is None


def test_round_robin_a_busy_source_cannot_starve_the_others() -> None:
    slots: LatestSlots[str] = LatestSlots()
    for i in range(100):
        slots.put("busy", f"b{i}", capacity=8)
    slots.put("quiet", "q0", capacity=8)
    served = [slots.take() for _ in range(4)]
    assert ("quiet", "q0") in served[:2]
    assert len(slots) == 8 - 3  # bounded: only the newest 8 of "busy" were ever kept


def test_memory_is_bounded_by_capacity() -> None:
    slots: LatestSlots[int] = LatestSlots()
    dropped = sum(slots.put("s", i, capacity=4) is not None for i in range(1000))
    assert len(slots) == 4 and dropped == 996
