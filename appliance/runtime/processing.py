"""From encoded frame to model input, and from model output to detections: numpy and Pillow only.

Runs in the worker process (see ``worker.py``): ``decode_frame`` -> ``preprocess_image`` -> the
session -> ``decode_outputs``. Nothing here imports ONNX Runtime, so it can be tested and reused
without a session. ``decode_frame`` keeps the decoded frame as a Pillow image, which
``preprocess_image`` resizes as it is (``decode_image`` gives a NumPy array instead, which costs two
more copies of the whole frame on the way to the model). Example::

    rgb = decode_frame(jpeg_bytes)
    tensor, transform = preprocess_image(rgb, card.input)
    raw = session.run(card.output_names(), {card.input.name: tensor})
    detections = decode_outputs(card, dict(zip(card.output_names(), raw)), transform)

Boxes in the results are ``(x1, y1, x2, y2)`` in the original frame, scaled to 0..1.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile

from appliance.errors import FrameRejected, RejectReason
from appliance.runtime.results import Detection
from formats.model_card import (
    BoxesOutput,
    ClassificationOutput,
    ImageInput,
    ModelCard,
    ScoreOutput,
    VectorInput,
    YoloOutput,
)

__all__ = [
    "FrameRejected",
    "Letterbox",
    "RejectReason",
    "decode_frame",
    "decode_image",
    "decode_outputs",
    "nms",
    "preprocess_image",
    "sniff_image",
    "vector_from_telemetry",
]

LETTERBOX_FILL = 114  # grey used by Ultralytics for letterbox padding
RESIZE_REDUCING_GAP = 3.0  # see Pillow's Image.resize
MAX_NMS_CANDIDATES = 30_000  # boxes above threshold considered by NMS, best first (bounds its cost)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

F32 = npt.NDArray[np.float32]


# --- decoding ------------------------------------------------------------------------------------


def sniff_image(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` from the magic bytes, else None; looks at the first 8 bytes only."""
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    return None


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> npt.NDArray[np.uint8]:
    """Decode a JPEG or PNG into an ``(H, W, 3)`` uint8 RGB array (see ``decode_frame``)."""
    return np.asarray(decode_frame(data, max_pixels), dtype=np.uint8)


def decode_frame(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode a JPEG or PNG into an RGB Pillow image, loaded.

    The size is checked from the header before any pixel is decoded; a truncated or corrupt file is
    rejected rather than padded with grey. Raises FrameRejected.
    """
    kind = sniff_image(data)
    if kind is None:
        raise FrameRejected(
            "not_an_image",
            f"payload of {len(data)} bytes is not a JPEG or PNG image (starts with {data[:8]!r}); "
            "publish the encoded JPEG or PNG file bytes",
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _has_end_marker(data, kind):
        # someone in this process told Pillow to accept truncated files; do not rely on it to refuse
        raise FrameRejected("corrupt_image", f"{kind.upper()} of {len(data)} bytes is truncated (no end marker)")
    try:
        # not closed: closing a Pillow image frees its pixels, and an in-memory file holds nothing else
        im = Image.open(io.BytesIO(data), formats=[kind.upper()])
        width, height = im.size
        if width * height > max_pixels:
            raise _too_large(kind, width, height, max_pixels)
        im.load()
        return _to_rgb(im)
    except FrameRejected:
        raise
    except Image.DecompressionBombError as e:
        raise FrameRejected(
            "image_too_large",
            f"{kind.upper()} header declares an image far over the limit of {max_pixels} pixels ({e}); "
            "send a smaller image",
        ) from e
    except Exception as e:  # Pillow raises many types on bad input; all mean the same here
        raise FrameRejected(
            "corrupt_image",
            f"{kind.upper()} of {len(data)} bytes could not be decoded ({type(e).__name__}: {e}); "
            "check that the camera sends complete files",
        ) from e


def _too_large(kind: str, width: int, height: int, max_pixels: int) -> FrameRejected:
    return FrameRejected(
        "image_too_large",
        f"{kind.upper()} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}; "
        "lower the camera resolution or raise the image pixel limit",
    )


def _has_end_marker(data: bytes, kind: str) -> bool:
    tail = data[-64:].rstrip(b"\x00")  # some encoders pad after the end marker
    if kind == "jpeg":
        return tail.endswith(b"\xff\xd9")
    return b"IEND" in tail


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale: Pillow's convert("RGB") clips instead of scaling
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


# --- preprocessing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Maps model-input pixel coordinates back to the original frame, scaled to 0..1.

    ``input = frame * scale + pad``. For a stretched resize the two axes scale differently and
    ``scale_y`` holds the vertical factor; None means the same as ``scale``.
    """

    scale: float
    pad_x: float
    pad_y: float
    orig_w: int
    orig_h: int
    scale_y: float | None = None

    def to_frame(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """One box in input pixels to the frame's 0..1 coordinates, clipped to the frame."""
        sy = self.scale if self.scale_y is None else self.scale_y
        fx1 = (x1 - self.pad_x) / self.scale / self.orig_w
        fx2 = (x2 - self.pad_x) / self.scale / self.orig_w
        fy1 = (y1 - self.pad_y) / sy / self.orig_h
        fy2 = (y2 - self.pad_y) / sy / self.orig_h
        return (_clip01(fx1), _clip01(fy1), _clip01(fx2), _clip01(fy2))

    def boxes_to_frame(self, boxes: F32) -> F32:
        """``[N, 4]`` xyxy in input pixels to frame 0..1 coordinates (vectorised ``to_frame``)."""
        sy = self.scale if self.scale_y is None else self.scale_y
        offset = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y], dtype=np.float32)
        factor = np.array(
            [self.scale * self.orig_w, sy * self.orig_h, self.scale * self.orig_w, sy * self.orig_h], dtype=np.float32
        )
        frame: F32 = np.clip((boxes - offset) / factor, 0.0, 1.0).astype(np.float32, copy=False)
        return frame


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def preprocess_image(rgb: npt.NDArray[np.uint8] | Image.Image,
                     spec: ImageInput) -> tuple[npt.NDArray[np.generic], Letterbox]:
    """Resize, reorder and normalise an RGB frame (an array, or an image from ``decode_frame``) into the input
    tensor the card describes (batch 1)."""
    if isinstance(rgb, Image.Image):
        if rgb.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {rgb.mode}")
        orig_w, orig_h = rgb.size
    elif rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    else:
        orig_h, orig_w = int(rgb.shape[0]), int(rgb.shape[1])
    in_w, in_h = spec.width, spec.height

    if spec.resize == "stretch":
        pixels = _resize(rgb, in_w, in_h)
        transform = Letterbox(in_w / orig_w, 0.0, 0.0, orig_w, orig_h, scale_y=in_h / orig_h)
    else:
        ratio = min(in_w / orig_w, in_h / orig_h)
        new_w = max(1, min(in_w, round(orig_w * ratio)))
        new_h = max(1, min(in_h, round(orig_h * ratio)))
        pad_x, pad_y = (in_w - new_w) // 2, (in_h - new_h) // 2
        if (new_w, new_h) == (in_w, in_h):
            pixels = _resize(rgb, in_w, in_h)
        else:
            pixels = np.full((in_h, in_w, 3), LETTERBOX_FILL, dtype=np.uint8)
            pixels[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = _resize(rgb, new_w, new_h)
        # the exact per-axis factors after rounding, so boxes map back without drift
        transform = Letterbox(new_w / orig_w, float(pad_x), float(pad_y), orig_w, orig_h, scale_y=new_h / orig_h)

    if spec.colour == "BGR":
        pixels = pixels[:, :, ::-1]
    chw = spec.layout == "NCHW"
    view = pixels.transpose(2, 0, 1) if chw else pixels

    if spec.dtype == "uint8":
        return np.ascontiguousarray(view)[None], transform

    tensor = np.empty((1, *view.shape), dtype=np.float32)
    tensor[0] = view  # the one float allocation; normalisation below is in place
    std = np.asarray(spec.std, dtype=np.float32)
    factor = np.float32(spec.scale) / std
    shift = np.asarray(spec.mean, dtype=np.float32) / std
    shape = (1, 3, 1, 1) if chw else (1, 1, 1, 3)
    if not np.all(factor == 1.0):
        tensor *= factor.reshape(shape)
    if np.any(shift != 0.0):
        tensor -= shift.reshape(shape)
    return tensor, transform


def _resize(rgb: npt.NDArray[np.uint8] | Image.Image, width: int, height: int) -> npt.NDArray[np.uint8]:
    if isinstance(rgb, Image.Image):
        im = rgb
    elif (rgb.shape[1], rgb.shape[0]) == (width, height):
        return rgb
    else:
        im = Image.fromarray(np.ascontiguousarray(rgb))
    if im.size == (width, height):
        return np.asarray(im, dtype=np.uint8)
    # reducing_gap: big downscales first shrink by an integer factor (fast), then resample; 3 is visually exact
    resized = im.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=RESIZE_REDUCING_GAP)
    return np.asarray(resized, dtype=np.uint8)


def vector_from_telemetry(values: dict[str, float], spec: VectorInput) -> F32:
    """The ``[1, F]`` float32 feature vector for a vector-input model, in the card's feature order."""
    missing = [name for name in spec.features if name not in values]
    if missing:
        have = ", ".join(sorted(values)) or "nothing"
        raise FrameRejected(
            "bad_telemetry",
            f"telemetry has no value for channel {', '.join(map(repr, missing))}, which model input "
            f"{spec.name!r} needs (got: {have}); send all of: {', '.join(spec.features)}",
        )
    vector = np.empty((1, len(spec.features)), dtype=np.float32)
    for i, name in enumerate(spec.features):
        raw = values[name]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(raw, bool) or not math.isfinite(value):
            raise FrameRejected("bad_telemetry", f"telemetry channel {name!r} has value {raw!r}; send a finite number")
        vector[0, i] = value
    return vector


# --- output decoding -----------------------------------------------------------------------------


def decode_outputs(
    card: ModelCard, outputs: Mapping[str, npt.NDArray[Any]], transform: Letterbox | None
) -> list[Detection]:
    """Turn raw session outputs into detections, best first, as the card's output decoder says.

    ``transform`` maps input pixels to the frame; None (no frame, or unknown) reports boxes in the
    model input's 0..1 coordinates.
    """
    out = card.output
    if isinstance(out, ClassificationOutput):
        found = _decode_classification(card, out, _get(outputs, out.name))
    elif isinstance(out, YoloOutput):
        found = _decode_yolo(card, out, _get(outputs, out.name), transform)
    elif isinstance(out, BoxesOutput):
        found = _decode_boxes(card, out, outputs, transform)
    elif isinstance(out, ScoreOutput):
        found = _decode_score(card, _get(outputs, out.name))
    else:  # pragma: no cover - the card's discriminated union is exhaustive
        raise TypeError(f"unknown output decoder {out!r}")
    found.sort(key=lambda d: d.score, reverse=True)
    return found


def _get(outputs: Mapping[str, npt.NDArray[Any]], name: str) -> F32:
    if name not in outputs:
        raise ValueError(f"the model produced no output {name!r} (got: {', '.join(sorted(outputs)) or 'none'})")
    arr: F32 = np.asarray(outputs[name], dtype=np.float32)
    return arr


def _drop_batch(arr: F32, ndim: int, what: str) -> F32:
    """Remove a leading batch dimension of 1 if present, leaving ``ndim`` dimensions."""
    if arr.ndim == ndim + 1:
        if arr.shape[0] != 1:
            raise ValueError(f"{what}: expected batch size 1, got shape {list(arr.shape)}")
        first: F32 = arr[0]
        return first
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions (plus an optional batch of 1), got {list(arr.shape)}")
    return arr


def _decode_classification(card: ModelCard, out: ClassificationOutput, arr: F32) -> list[Detection]:
    if arr.size == 0:
        raise ValueError(f"output {out.name!r} is empty")
    if arr.ndim > 1 and arr.shape[0] != 1:
        raise ValueError(f"output {out.name!r}: expected batch size 1, got shape {list(arr.shape)}")
    logits = arr.reshape(-1).astype(np.float64)  # [1, C], [C] or [1, C, 1, 1]
    if out.softmax:
        e = np.exp(logits - logits.max())
        probs = e / e.sum()
    else:
        probs = logits
    k = min(out.top_k, probs.size)
    top = np.argsort(-probs, kind="stable")[:k]
    return [Detection(card.label(int(i)), float(probs[i])) for i in top if math.isfinite(probs[i])]


def _input_size(card: ModelCard) -> tuple[int, int]:
    spec = card.input
    if not isinstance(spec, ImageInput):
        raise TypeError(f"decoder {card.output.decoder!r} needs an image input")
    return spec.width, spec.height


def _to_frame(boxes_px: F32, transform: Letterbox | None, card: ModelCard) -> F32:
    if transform is not None:
        return transform.boxes_to_frame(boxes_px)
    in_w, in_h = _input_size(card)
    scale = np.array([in_w, in_h, in_w, in_h], dtype=np.float32)
    frame: F32 = np.clip(boxes_px / scale, 0.0, 1.0).astype(np.float32, copy=False)
    return frame


def _decode_yolo(card: ModelCard, out: YoloOutput, arr: F32, transform: Letterbox | None) -> list[Detection]:
    pred = _drop_batch(arr, 2, f"output {out.name!r}")
    rows = 4 + len(card.labels)
    if pred.shape[0] != rows and pred.shape[1] == rows:
        pred = pred.T  # some exports are [N, 4 + classes]
    if pred.shape[0] < 5:
        raise ValueError(f"output {out.name!r}: expected [1, 4 + classes, N], got {list(arr.shape)}")
    class_scores = pred[4:]
    classes = class_scores.argmax(axis=0)
    scores = class_scores[classes, np.arange(pred.shape[1])]
    keep = np.flatnonzero((scores >= out.score_threshold) & np.isfinite(scores))
    if keep.size == 0:
        return []
    if keep.size > MAX_NMS_CANDIDATES:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_NMS_CANDIDATES]]
    cx, cy, w, h = pred[0, keep], pred[1, keep], pred[2, keep], pred[3, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
    scores, classes = scores[keep], classes[keep]
    kept = _batched_nms(boxes, scores, classes, out.iou_threshold)[: out.max_detections]
    frame = _to_frame(boxes[kept], transform, card)
    return [Detection(card.label(int(c)), float(s), _box(b)) for b, s, c in zip(frame, scores[kept], classes[kept])]


def _decode_boxes(
    card: ModelCard, out: BoxesOutput, outputs: Mapping[str, npt.NDArray[Any]], transform: Letterbox | None
) -> list[Detection]:
    boxes = _get(outputs, out.boxes)
    boxes = _drop_batch(boxes, 2, f"output {out.boxes!r}") if boxes.ndim == 3 else boxes.reshape(-1, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"output {out.boxes!r}: expected [1, N, 4], got {list(boxes.shape)}")
    n = boxes.shape[0]
    scores = _get(outputs, out.scores)
    classes = _get(outputs, out.classes)
    if scores.size != n or classes.size != n:
        raise ValueError(
            f"outputs disagree on the number of boxes: {out.boxes!r} has {n}, "
            f"{out.scores!r} has {scores.size}, {out.classes!r} has {classes.size}"
        )
    scores, classes = scores.reshape(-1), classes.reshape(-1)  # [1, N], [N] or [1, N, 1]
    keep = np.flatnonzero((scores >= out.score_threshold) & np.isfinite(scores) & np.isfinite(classes))
    boxes = _as_xyxy(boxes[keep], out.box_format)
    if out.normalized:
        in_w, in_h = _input_size(card)
        boxes = boxes * np.array([in_w, in_h, in_w, in_h], dtype=np.float32)
    frame = _to_frame(boxes, transform, card)
    return [
        Detection(card.label(round(float(c))), float(s), _box(b)) for b, s, c in zip(frame, scores[keep], classes[keep])
    ]


def _as_xyxy(boxes: F32, box_format: str) -> F32:
    if box_format == "yxyx":
        boxes = boxes[:, [1, 0, 3, 2]]
    elif box_format == "cxcywh":
        cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    # corners in either order (some models emit x2 < x1) read as the same box
    x1, x2 = np.minimum(boxes[:, 0], boxes[:, 2]), np.maximum(boxes[:, 0], boxes[:, 2])
    y1, y2 = np.minimum(boxes[:, 1], boxes[:, 3]), np.maximum(boxes[:, 1], boxes[:, 3])
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32, copy=False)


def _decode_score(card: ModelCard, arr: F32) -> list[Detection]:
    if arr.size != 1:
        raise ValueError(f"expected a single score ([1, 1] or [1]), got shape {list(arr.shape)}")
    value = float(arr.reshape(-1)[0])
    if not math.isfinite(value):
        raise ValueError(f"the model produced a non-finite score ({value})")
    return [Detection("anomaly" if card.task == "anomaly" else "value", value)]


def _box(b: F32) -> tuple[float, float, float, float]:
    return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))


def _batched_nms(boxes: F32, scores: F32, classes: npt.NDArray[np.intp], iou_threshold: float) -> npt.NDArray[np.intp]:
    """Class-aware NMS: shift each class's boxes apart so that boxes of different classes never overlap."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.intp)
    span = float(boxes.max() - min(0.0, float(boxes.min()))) + 1.0
    shifted = boxes + (classes.astype(np.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


def nms(
    boxes_xyxy: npt.NDArray[np.floating], scores: npt.NDArray[np.floating], iou_threshold: float
) -> npt.NDArray[np.intp]:
    """Greedy non-maximum suppression; returns the indices of the kept boxes, best score first.

    A box is dropped when its IoU with a better kept box is above ``iou_threshold``.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float32).reshape(-1), kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    kept: list[int] = []
    while order.size:
        i = int(order[0])
        kept.append(i)
        rest = order[1:]
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[iou <= iou_threshold]
    return np.asarray(kept, dtype=np.intp)
