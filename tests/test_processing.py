"""Frame decoding, preprocessing and output decoding (numpy and Pillow only; no model needed)."""

from __future__ import annotations

import io
import math
import pickle
import struct
import zlib
from typing import Literal

import numpy as np
import pytest
from PIL import Image, ImageFile

from appliance.demo.scene import render_frame
from appliance.runtime.processing import (
    FrameRejected,
    Letterbox,
    decode_frame,
    decode_image,
    decode_outputs,
    nms,
    preprocess_image,
    sniff_image,
    vector_from_telemetry,
)
from formats.model_card import (
    BoxesOutput,
    ClassificationOutput,
    ImageInput,
    ModelCard,
    ScoreOutput,
    VectorInput,
    YoloOutput,
)


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _rejected(data: bytes, max_pixels: int = 40_000_000) -> FrameRejected:
    with pytest.raises(FrameRejected) as info:
        decode_image(data, max_pixels=max_pixels)
    return info.value


def _image_card(input_spec: ImageInput, output: YoloOutput | BoxesOutput | ClassificationOutput) -> ModelCard:
    task: Literal["classification", "detection"] = (
        "classification" if isinstance(output, ClassificationOutput) else "detection"
    )
    return ModelCard(name="t", version="1", task=task, input=input_spec, output=output, labels=["person", "helmet"])


SPEC_320 = ImageInput(name="images", width=320, height=320)


# --- decoding ------------------------------------------------------------------------------------


def test_sniff_image_reads_magic_bytes() -> None:
    assert sniff_image(render_frame(0.0, 0)) == "jpeg"
    assert sniff_image(_encode(Image.new("RGB", (4, 4)))) == "png"
    assert sniff_image(b"GIF89a....") is None
    assert sniff_image(b"") is None


def test_decode_jpeg_gives_rgb_array_of_frame_size() -> None:
    rgb = decode_image(render_frame(0.0, 0, width=640, height=480))
    assert rgb.shape == (480, 640, 3)
    assert rgb.dtype == np.uint8


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_the_workers_pillow_path_gives_the_model_the_same_tensor_as_the_array_path(resize: str) -> None:
    """The worker keeps the decoded frame as a Pillow image and resizes it as it is (two fewer copies of the
    frame); the model must see exactly what the array path gives, boxes included."""
    jpeg = render_frame(0.7, 3, width=640, height=480)
    spec = ImageInput(name="images", layout="NCHW", width=224, height=224, colour="RGB", mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), scale=1 / 255, resize=resize)
    frame = decode_frame(jpeg)
    assert frame.mode == "RGB" and frame.size == (640, 480)
    via_image, box_a = preprocess_image(frame, spec)
    via_array, box_b = preprocess_image(decode_image(jpeg), spec)
    assert np.array_equal(via_image, via_array) and box_a == box_b


def test_text_payload_is_not_an_image() -> None:
    err = _rejected(b'{"temp": 21.5}')
    assert err.reason == "not_an_image"
    assert "JPEG or PNG" in str(err)


def test_truncated_jpeg_is_corrupt() -> None:
    jpeg = render_frame(1.0, 0)
    for cut in (2, 500, len(jpeg) // 2):
        err = _rejected(jpeg[:-cut])
        assert err.reason == "corrupt_image", cut
        assert str(err) == err.detail


def test_truncated_jpeg_is_corrupt_even_if_pillow_was_told_to_accept_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpeg = render_frame(1.0, 0)
    assert _rejected(jpeg[: len(jpeg) // 2]).reason == "corrupt_image"
    assert decode_image(jpeg).shape == (480, 640, 3)


def test_truncated_png_is_corrupt() -> None:
    rng = np.random.default_rng(0)
    png = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    assert _rejected(png[: len(png) // 2]).reason == "corrupt_image"


def test_garbage_after_jpeg_magic_is_corrupt() -> None:
    assert _rejected(b"\xff\xd8\xff\xe0" + b"\x00" * 100).reason == "corrupt_image"


def test_png_header_claiming_huge_size_is_too_large() -> None:
    err = _rejected(_png_claiming(100_000, 100_000))
    assert err.reason == "image_too_large"


def test_image_over_max_pixels_is_rejected_before_decoding() -> None:
    err = _rejected(_png_claiming(8000, 6000))  # 48 MP, below Pillow's own bomb limit
    assert err.reason == "image_too_large"
    assert "8000x6000" in err.detail
    assert _rejected(render_frame(0.0, 0), max_pixels=1000).reason == "image_too_large"


def test_greyscale_png_becomes_rgb() -> None:
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    rgb = decode_image(_encode(Image.fromarray(grey, mode="L")))
    assert rgb.shape == (8, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], grey)


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped() -> None:
    grey16 = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    rgb = decode_image(_encode(Image.fromarray(grey16)))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_other_png_modes_become_rgb(mode: str) -> None:
    im = Image.new("RGB", (5, 3), (200, 10, 30))
    im = im.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else im.convert(mode)
    rgb = decode_image(_encode(im))
    assert rgb.shape == (3, 5, 3)
    if mode != "LA":
        assert tuple(rgb[1, 1]) == (200, 10, 30)


def test_frame_rejected_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(FrameRejected("bad_telemetry", "no temp")))
    assert (err.reason, err.detail, str(err)) == ("bad_telemetry", "no temp", "no temp")


# --- preprocessing -------------------------------------------------------------------------------


def test_letterbox_pads_grey_and_keeps_aspect() -> None:
    rgb = np.full((480, 640, 3), 255, dtype=np.uint8)
    tensor, transform = preprocess_image(rgb, SPEC_320)
    assert tensor.shape == (1, 3, 320, 320)
    assert tensor.dtype == np.float32
    assert (transform.scale, transform.pad_x, transform.pad_y) == (0.5, 0.0, 40.0)
    assert np.allclose(tensor[0, :, :40, :], 114 / 255)  # top band
    assert np.allclose(tensor[0, :, 280:, :], 114 / 255)  # bottom band
    assert np.allclose(tensor[0, :, 40:280, :], 1.0)


def test_box_in_input_maps_back_to_frame_for_landscape_frame() -> None:
    transform = preprocess_image(np.zeros((480, 640, 3), dtype=np.uint8), SPEC_320)[1]
    # input (100, 60)-(200, 140) is frame pixels (200, 40)-(400, 200) once the 40 px band and x0.5 are undone
    got = transform.to_frame(100, 60, 200, 140)
    assert got == pytest.approx((200 / 640, 40 / 480, 400 / 640, 200 / 480))


def test_box_in_input_maps_back_to_frame_for_portrait_frame() -> None:
    transform = preprocess_image(np.zeros((600, 300, 3), dtype=np.uint8), SPEC_320)[1]
    assert transform.pad_x == 80.0 and transform.pad_y == 0.0
    got = transform.to_frame(80, 0, 240, 160)
    assert got == pytest.approx((0.0, 0.0, 1.0, 0.5))
    assert transform.to_frame(0, -10, 400, 500) == (0.0, 0.0, 1.0, 1.0)  # clipped to the frame


def test_drawn_rectangle_round_trips_through_letterbox() -> None:
    """A bright block in a 1280x720 frame, located in the model input, maps back onto itself."""
    rgb = np.zeros((720, 1280, 3), dtype=np.uint8)
    rgb[200:400, 640:960] = 255
    tensor, transform = preprocess_image(rgb, SPEC_320)
    ys, xs = np.nonzero(tensor[0, 0] > 0.9)
    got = transform.to_frame(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    assert got == pytest.approx((640 / 1280, 200 / 720, 960 / 1280, 400 / 720), abs=0.01)


def test_vectorised_mapping_matches_to_frame() -> None:
    transform = Letterbox(scale=0.5, pad_x=0.0, pad_y=40.0, orig_w=640, orig_h=480)
    boxes = np.array([[100, 60, 200, 140], [0, 0, 320, 320]], dtype=np.float32)
    mapped = transform.boxes_to_frame(boxes)
    for row, box in zip(mapped, boxes):
        assert tuple(row) == pytest.approx(transform.to_frame(*map(float, box)))


def test_stretch_bgr_nhwc_mean_std() -> None:
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :] = (10, 20, 30)
    spec = ImageInput(
        name="x",
        layout="NHWC",
        width=50,
        height=40,
        colour="BGR",
        scale=1.0,
        mean=(1.0, 2.0, 3.0),
        std=(2.0, 4.0, 9.0),
        resize="stretch",
    )
    tensor, transform = preprocess_image(rgb, spec)
    assert tensor.shape == (1, 40, 50, 3)
    # BGR order, then (pixel - mean) / std per channel in that order
    assert tensor[0, 5, 5].tolist() == pytest.approx([(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 9])
    assert transform.to_frame(0, 0, 25, 20) == pytest.approx((0.0, 0.0, 0.5, 0.5))


def test_uint8_input_is_raw_pixels() -> None:
    rgb = np.full((64, 64, 3), 77, dtype=np.uint8)
    spec = ImageInput(name="x", width=64, height=64, dtype="uint8", mean=(5.0, 5.0, 5.0))
    tensor, _ = preprocess_image(rgb, spec)
    assert tensor.dtype == np.uint8 and tensor.shape == (1, 3, 64, 64)
    assert np.all(tensor == 77)


# --- telemetry -----------------------------------------------------------------------------------

GAS = VectorInput(name="features", features=["ch4", "temp"])


def test_vector_follows_card_order() -> None:
    vector = vector_from_telemetry({"temp": 25.0, "ch4": 0.5, "humidity": 40.0}, GAS)
    assert vector.dtype == np.float32
    assert vector.tolist() == [[0.5, 25.0]]


def test_missing_feature_is_bad_telemetry_naming_the_channel() -> None:
    with pytest.raises(FrameRejected) as info:
        vector_from_telemetry({"ch4": 0.5}, GAS)
    assert info.value.reason == "bad_telemetry"
    assert "'temp'" in info.value.detail


def test_non_finite_feature_is_bad_telemetry() -> None:
    with pytest.raises(FrameRejected) as info:
        vector_from_telemetry({"ch4": math.nan, "temp": 20.0}, GAS)
    assert info.value.reason == "bad_telemetry"
    assert "'ch4'" in info.value.detail


# --- NMS and output decoding ---------------------------------------------------------------------


def test_nms_keeps_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 5]], dtype=np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], dtype=np.float32)
    # box 1 suppresses box 0 (IoU 0.68); box 3 overlaps box 0 with IoU 0.5 but box 1 only with 0.32
    assert nms(boxes, scores, 0.5).tolist() == [1, 2, 3]
    assert nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def _yolo_output(rows: list[tuple[float, float, float, float, float, float]]) -> np.ndarray:
    return np.array(rows, dtype=np.float32).T[None]  # [1, 6, N]


def test_yolo_decode_is_class_aware_and_maps_to_frame() -> None:
    card = _image_card(SPEC_320, YoloOutput(name="output0", score_threshold=0.3, iou_threshold=0.45))
    raw = _yolo_output(
        [
            (100, 100, 40, 40, 0.9, 0.0),  # person
            (102, 101, 40, 40, 0.8, 0.1),  # the same person, suppressed
            (101, 100, 40, 40, 0.0, 0.7),  # a helmet on the same spot: a different class, kept
            (200, 200, 20, 20, 0.2, 0.1),  # below threshold
        ]
    )
    transform = Letterbox(scale=0.5, pad_x=0.0, pad_y=40.0, orig_w=640, orig_h=480)
    found = decode_outputs(card, {"output0": raw}, transform)
    assert [(d.label, round(d.score, 2)) for d in found] == [("person", 0.9), ("helmet", 0.7)]
    assert found[0].box == pytest.approx(transform.to_frame(80, 80, 120, 120))
    # without the batch dimension, and transposed ([N, 4 + classes]), the result is the same
    assert decode_outputs(card, {"output0": raw[0]}, transform) == found
    assert decode_outputs(card, {"output0": raw[0].T}, transform) == found


def test_yolo_decode_limits_detections_and_sorts() -> None:
    card = _image_card(SPEC_320, YoloOutput(name="output0", max_detections=3))
    raw = _yolo_output([(20.0 + 30 * i, 50, 10, 10, 0.3 + 0.05 * i, 0) for i in range(8)])
    found = decode_outputs(card, {"output0": raw}, None)
    assert [round(d.score, 2) for d in found] == [0.65, 0.6, 0.55]
    assert found[0].box == pytest.approx(((230 - 5) / 320, 45 / 320, (230 + 5) / 320, 55 / 320))


@pytest.mark.parametrize(
    ("box_format", "normalized", "box"),
    [
        ("xyxy", True, (0.25, 0.375, 0.5, 0.625)),
        ("yxyx", True, (0.375, 0.25, 0.625, 0.5)),
        ("cxcywh", True, (0.375, 0.5, 0.25, 0.25)),
        ("xyxy", False, (80, 120, 160, 200)),
    ],
)
def test_boxes_scores_classes_formats(
    box_format: Literal["xyxy", "yxyx", "cxcywh"], normalized: bool, box: tuple[float, ...]
) -> None:
    output = BoxesOutput(
        boxes="b", scores="s", classes="c", box_format=box_format, normalized=normalized, score_threshold=0.5
    )
    card = _image_card(SPEC_320, output)
    outputs = {
        "b": np.array([[box, box]], dtype=np.float32),
        "s": np.array([[0.9, 0.1]], dtype=np.float32),
        "c": np.array([[1.0, 0.0]], dtype=np.float32),
    }
    transform = Letterbox(scale=0.5, pad_x=0.0, pad_y=40.0, orig_w=640, orig_h=480)
    found = decode_outputs(card, outputs, transform)
    assert len(found) == 1 and found[0].label == "helmet"
    assert found[0].box == pytest.approx(transform.to_frame(80, 120, 160, 200))
    # int classes and no batch dimension read the same
    outputs = {"b": outputs["b"][0], "s": outputs["s"][0], "c": outputs["c"][0].astype(np.int64)}
    assert decode_outputs(card, outputs, transform) == found


def test_classification_softmax_top_k() -> None:
    card = _image_card(SPEC_320, ClassificationOutput(name="logits", top_k=2))
    found = decode_outputs(card, {"logits": np.array([[0.0, 2.0, 1.0]], dtype=np.float32)}, None)
    assert [d.label for d in found] == ["helmet", "class_2"]  # index 2 has no label
    e = np.exp([0.0, 2.0, 1.0])
    assert found[0].score == pytest.approx(e[1] / e.sum())
    assert found[0].box is None


def test_classification_without_softmax_reports_raw_values() -> None:
    card = _image_card(SPEC_320, ClassificationOutput(name="probs", softmax=False, top_k=1))
    found = decode_outputs(card, {"probs": np.array([0.2, 0.7], dtype=np.float32)}, None)
    assert [d.label for d in found] == ["helmet"]
    assert found[0].score == pytest.approx(0.7)


@pytest.mark.parametrize(("task", "label"), [("anomaly", "anomaly"), ("regression", "value")])
def test_score_output(task: Literal["anomaly", "regression"], label: str) -> None:
    card = ModelCard(name="g", version="1", task=task, input=GAS, output=ScoreOutput(name="score"))
    for raw in (np.array([[3.5]], dtype=np.float32), np.array([3.5], dtype=np.float32)):
        assert [(d.label, d.score, d.box) for d in decode_outputs(card, {"score": raw}, None)] == [(label, 3.5, None)]


def test_missing_output_is_a_clear_error() -> None:
    card = _image_card(SPEC_320, YoloOutput(name="output0"))
    with pytest.raises(ValueError, match="no output 'output0'"):
        decode_outputs(card, {"other": np.zeros((1, 6, 1), dtype=np.float32)}, None)
