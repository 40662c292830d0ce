"""Rule engine (matching, debounce, cool-down, per-source state) and event snapshots."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from appliance.rules import (
    CARD_SIZE,
    Firing,
    RuleEngine,
    SnapshotError,
    draw_snapshot,
    point_in_polygon,
    render_telemetry_card,
)
from appliance.runtime.results import Detection
from formats.app_manifest import AppManifest

CAM1 = "cameras/cam1/frame"
CAM2 = "cameras/cam2/frame"
PERSON = Detection("person", 0.9, (0.4, 0.4, 0.6, 0.6))  # centre (0.5, 0.5)


def engine(**rule: Any) -> RuleEngine:
    rule = {"name": "r", "cooldown_s": 0, **rule}
    manifest = AppManifest.model_validate(
        {
            "schema": 1,
            "name": "ppe-watch",
            "version": "1.2.3",
            "model": {"name": "ppe-detector", "version": "1.0.0"},
            "sources": ["cameras/+/frame"],
            "rules": [rule],
        }
    )
    return RuleEngine(manifest)


def fired(e: RuleEngine, source: str, dets: list[Detection], ts: float) -> bool:
    return bool(e.evaluate(source, dets, ts))


def run(e: RuleEngine, pattern: str, source: str = CAM1, start: float = 0.0) -> list[bool]:
    """Feed one frame per character ('x' = a matching person, '.' = nothing), one second apart."""
    return [fired(e, source, [PERSON] if c == "x" else [], start + i) for i, c in enumerate(pattern)]


# --- matching -------------------------------------------------------------------------------------


def test_firing_carries_app_rule_source_and_best_detection() -> None:
    e = engine(labels=["person"])
    weak = Detection("person", 0.6, (0.1, 0.1, 0.2, 0.2))
    car = Detection("car", 0.99, (0.1, 0.1, 0.2, 0.2))
    (f,) = e.evaluate(CAM1, [weak, car, PERSON], ts=100.0)
    assert f == Firing("ppe-watch", "1.2.3", "r", CAM1, 100.0, PERSON, (weak, PERSON))
    assert f.to_json()["detection"] == PERSON.to_json()


def test_labels_filter() -> None:
    e = engine(labels=["person", "helmet"])
    assert not fired(e, CAM1, [Detection("car", 0.9)], 0)
    assert fired(e, CAM1, [Detection("helmet", 0.9)], 1)
    assert fired(engine(labels=[]), CAM1, [Detection("anything", 0.9)], 0)


def test_min_score_is_inclusive() -> None:
    e = engine(min_score=0.7)
    assert not fired(e, CAM1, [Detection("person", 0.69)], 0)
    assert fired(e, CAM1, [Detection("person", 0.7)], 1)
    assert not fired(e, CAM1, [Detection("person", float("nan"))], 2)


def test_zone_uses_box_centre() -> None:
    e = engine(zone=[(0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0)])  # left half
    # Box overlaps the zone but its centre (0.6, 0.5) is outside.
    assert not fired(e, CAM1, [Detection("person", 0.9, (0.3, 0.3, 0.9, 0.7))], 0)
    # Centre (0.3, 0.5) inside, although the box reaches into the right half.
    assert fired(e, CAM1, [Detection("person", 0.9, (0.1, 0.3, 0.5, 0.7))], 1)
    # Centre exactly on the zone edge counts as inside.
    assert fired(e, CAM1, [PERSON], 2)


def test_zone_rule_ignores_detections_without_box() -> None:
    e = engine(zone=[(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)])
    assert not fired(e, CAM1, [Detection("person", 0.99)], 0)


@pytest.mark.parametrize(
    ("x", "y", "inside"),
    [
        (0.5, 0.5, True),
        (0.0, 0.0, True),  # vertex
        (1.0, 0.3, True),  # edge
        (0.5, 1.0, True),  # edge
        (1.01, 0.5, False),
        (-0.01, 0.5, False),
    ],
)
def test_point_in_square(x: float, y: float, inside: bool) -> None:
    assert point_in_polygon(x, y, [(0, 0), (1, 0), (1, 1), (0, 1)]) is inside


def test_point_in_concave_polygon() -> None:
    u_shape = [(0, 0), (0.3, 0), (0.3, 0.7), (0.7, 0.7), (0.7, 0), (1, 0), (1, 1), (0, 1)]
    assert point_in_polygon(0.1, 0.5, u_shape)
    assert not point_in_polygon(0.5, 0.3, u_shape)  # in the notch
    assert point_in_polygon(0.5, 0.85, u_shape)
    assert point_in_polygon(0.5, 0.7, u_shape)  # on the notch's bottom edge


def test_point_in_polygon_ray_through_a_vertex() -> None:
    diamond = [(0, 0.5), (0.5, 0.1), (1, 0.5), (0.5, 1)]
    assert not point_in_polygon(0.2, 0.1, diamond)  # ray grazes the top vertex: counted twice, still outside
    assert point_in_polygon(0.2, 0.5, diamond)  # ray leaves through the right vertex: counted once
    assert not point_in_polygon(0.5, 0.0, diamond)


# --- debounce and cool-down -----------------------------------------------------------------------


def test_debounce_two_of_three() -> None:
    assert run(engine(debounce={"n": 2, "m": 3}), "x.x") == [False, False, True]
    assert run(engine(debounce={"n": 2, "m": 3}), "x..x") == [False, False, False, False]


def test_debounce_requires_the_current_frame_to_match() -> None:
    # After "xx" the window holds 2 of 3 matches, but a miss never fires.
    assert run(engine(debounce={"n": 2, "m": 3}), "xx.") == [False, True, False]


def test_default_debounce_fires_on_every_match() -> None:
    assert run(engine(), "x.xx") == [True, False, True, True]


def test_cooldown_suppresses_then_allows() -> None:
    e = engine(cooldown_s=10)
    assert fired(e, CAM1, [PERSON], 100.0)
    assert not fired(e, CAM1, [PERSON], 105.0)
    assert not fired(e, CAM1, [PERSON], 109.999)
    assert fired(e, CAM1, [PERSON], 110.0)
    assert not fired(e, CAM1, [PERSON], 111.0)


def test_an_upgrade_with_the_same_rules_keeps_cooldown_and_debounce() -> None:
    e = engine(cooldown_s=10, debounce={"n": 2, "m": 3})
    assert run(e, "xx") == [False, True]
    same_rules = e.manifest.model_copy(update={"version": "1.3.0"})
    upgraded = e.successor(same_rules)
    assert not fired(upgraded, CAM1, [PERSON], 5.0), "the alert is still cooling down after the model upgrade"
    [firing] = upgraded.evaluate(CAM1, [PERSON], 11.0)
    assert firing.app_version == "1.3.0"
    new_rules = engine(cooldown_s=10, debounce={"n": 1, "m": 1}).manifest
    assert fired(e.successor(new_rules), CAM1, [PERSON], 12.0), "new rules start afresh"


def test_frames_during_cooldown_still_fill_the_debounce_window() -> None:
    e = engine(cooldown_s=5, debounce={"n": 3, "m": 3})
    assert run(e, "xxxxxx", start=0) == [False, False, True, False, False, False]
    assert fired(e, CAM1, [PERSON], 7.0)  # window already full of matches when the cool-down ends


def test_clock_stepped_back_beyond_cooldown_ends_it() -> None:
    e = engine(cooldown_s=10)
    assert fired(e, CAM1, [PERSON], 1000.0)
    assert not fired(e, CAM1, [PERSON], 995.0)  # small step back: still cooling down
    assert fired(e, CAM1, [PERSON], 500.0)


def test_non_finite_timestamp_is_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        engine().evaluate(CAM1, [PERSON], float("nan"))


def test_sources_are_independent() -> None:
    e = engine(debounce={"n": 2, "m": 2}, cooldown_s=60)
    assert not fired(e, CAM1, [PERSON], 0)
    assert not fired(e, CAM2, [PERSON], 1)  # CAM1's match does not count for CAM2
    assert fired(e, CAM1, [PERSON], 2)
    assert fired(e, CAM2, [PERSON], 3)  # CAM1's cool-down does not hold CAM2 back
    assert not fired(e, CAM1, [PERSON], 4)


def test_rules_are_independent_and_fire_in_manifest_order() -> None:
    manifest = AppManifest.model_validate(
        {
            "name": "site",
            "version": "1.0.0",
            "model": {"name": "m", "version": "1.0.0"},
            "sources": ["cameras/+/frame"],
            "rules": [
                {"name": "any-person", "labels": ["person"], "cooldown_s": 0},
                {"name": "sure-person", "labels": ["person"], "min_score": 0.8, "debounce": {"n": 2, "m": 2}},
            ],
        }
    )
    e = RuleEngine(manifest)
    assert [f.rule for f in e.evaluate(CAM1, [PERSON], 0)] == ["any-person"]
    assert [f.rule for f in e.evaluate(CAM1, [PERSON], 1)] == ["any-person", "sure-person"]


def test_forget_drops_debounce_and_cooldown_state() -> None:
    e = engine(debounce={"n": 2, "m": 2}, cooldown_s=60)
    assert run(e, "xx") == [False, True]
    assert e.tracked_sources == {CAM1}
    e.forget(CAM1)
    e.forget("cameras/never-seen/frame")
    assert e.tracked_sources == frozenset()
    assert not fired(e, CAM1, [PERSON], 2)  # debounce window restarted
    assert fired(e, CAM1, [PERSON], 3)  # and no cool-down left over


# --- snapshots ------------------------------------------------------------------------------------

GREY = (128, 128, 128)


def image_bytes(size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB", colour: Any = GREY) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def open_jpeg(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    img.load()
    return img.convert("RGB")


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return sum(abs(p - q) for p, q in zip(a, b, strict=True))


def test_snapshot_downscales_and_draws_boxes() -> None:
    box = Detection("person", 0.9, (0.25, 0.25, 0.75, 0.75))
    out = open_jpeg(draw_snapshot(image_bytes((2000, 1000)), [box], max_side=1280))
    assert out.size == (1280, 640)
    # Left and top edges of the box, after scaling: x = 320, y = 160; the middle is untouched.
    assert distance(out.getpixel((320, 400)), GREY) > 100  # type: ignore[arg-type]
    assert distance(out.getpixel((700, 160)), GREY) > 100  # type: ignore[arg-type]
    assert distance(out.getpixel((640, 400)), GREY) < 30  # type: ignore[arg-type]


def test_snapshot_highlight_has_its_own_colour_and_is_thicker() -> None:
    plain = Detection("person", 0.6, (0.1, 0.5, 0.3, 0.9))
    best = Detection("person", 0.95, (0.6, 0.5, 0.9, 0.9))
    out = open_jpeg(draw_snapshot(image_bytes((640, 480), fmt="PNG"), [plain, best], highlight=best))
    assert out.size == (640, 480)  # never upscaled
    x_plain, x_best, y = round(0.1 * 640), round(0.6 * 640), round(0.7 * 480)
    plain_px, best_px = out.getpixel((x_plain, y)), out.getpixel((x_best, y))
    assert isinstance(plain_px, tuple) and isinstance(best_px, tuple)
    assert distance(plain_px, best_px) > 100
    assert best_px[0] > 200 and best_px[1] < 100  # red
    # Thicker: a pixel a few pixels inside the highlight's edge is still coloured, the plain one's not.
    assert distance(out.getpixel((x_best + 3, y)), GREY) > 100  # type: ignore[arg-type]
    assert distance(out.getpixel((x_plain + 3, y)), GREY) < 30  # type: ignore[arg-type]


def test_snapshot_writes_unlocated_results_on_a_top_band() -> None:
    out = open_jpeg(draw_snapshot(image_bytes((320, 240)), [Detection("cat", 0.8), Detection("dog", 0.1)]))
    assert out.size == (320, 240)
    band = out.crop((0, 0, 320, 8)).convert("L")
    assert band.getextrema()[0] < 40  # type: ignore[operator]
    assert distance(out.getpixel((160, 200)), GREY) < 30  # type: ignore[arg-type]


def test_snapshot_accepts_rgba_png_and_boxes_out_of_range() -> None:
    frame = image_bytes((100, 50), fmt="PNG", mode="RGBA", colour=(10, 20, 30, 128))
    dets = [Detection("x", 0.5, (-0.2, 0.5, 1.4, 0.8)), Detection("y", 0.5, (0.9, 0.9, 0.1, 0.1))]
    assert open_jpeg(draw_snapshot(frame, dets, highlight=Detection("z", 0.9), quality=50)).size == (100, 50)


@pytest.mark.parametrize("frame", [b"", b"not an image", image_bytes((64, 64))[:100], image_bytes((8, 8), fmt="GIF")])
def test_snapshot_rejects_undecodable_frames(frame: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode frame"):
        draw_snapshot(frame, [])
    with pytest.raises(SnapshotError):
        draw_snapshot(frame, [])


def test_snapshot_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_side"):
        draw_snapshot(image_bytes((8, 8)), [], max_side=0)
    with pytest.raises(ValueError, match="quality"):
        draw_snapshot(image_bytes((8, 8)), [], quality=0)


def test_telemetry_card_is_a_jpeg() -> None:
    values = {f"channel_{i}": i * 1.5 for i in range(40)}  # more than fit: summarised as "+N more"
    card = render_telemetry_card("sensors/pump1/telemetry", values, Detection("anomaly", 0.97), 1_700_000_000.0)
    img = open_jpeg(card)
    assert img.size == CARD_SIZE
    assert open_jpeg(render_telemetry_card("s" * 500, {}, Detection("anomaly", 0.5), 1e20)).size == CARD_SIZE
