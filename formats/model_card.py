"""The model card (``model.json``): what a model is and how to feed it and read its output.

A model package is ``model.onnx`` plus this card. The appliance checks the card against the
ONNX graph at install; the AppStore publishes the same document as a TUF target.

Example (a YOLOv8-style detector)::

    {
      "schema": 1, "name": "ppe-detector", "version": "1.0.0", "task": "detection",
      "input": {"kind": "image", "name": "images", "layout": "NCHW", "width": 320, "height": 320,
                "colour": "RGB", "scale": 0.00392156862745098, "resize": "letterbox"},
      "output": {"decoder": "yolo", "name": "output0", "score_threshold": 0.25, "iou_threshold": 0.45},
      "labels": ["person", "helmet"]
    }
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from formats.errors import FormatError, load_json_document, parse_json_document

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageInput(_Strict):
    """An image tensor: ``[1, 3, H, W]`` (NCHW) or ``[1, H, W, 3]`` (NHWC)."""

    kind: Literal["image"] = "image"
    name: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    width: int = Field(gt=0, le=8192)  # pixels
    height: int = Field(gt=0, le=8192)  # pixels
    colour: Literal["RGB", "BGR"] = "RGB"
    dtype: Literal["float32", "uint8"] = "float32"
    # value = (pixel * scale - mean) / std, per channel in the model's colour order
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: Literal["letterbox", "stretch"] = "letterbox"

    @model_validator(mode="after")
    def _std_not_zero(self) -> ImageInput:
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class VectorInput(_Strict):
    """A feature vector ``[1, F]`` built from telemetry channels, in the listed order."""

    kind: Literal["vector"] = "vector"
    name: str
    features: list[str] = Field(min_length=1)
    dtype: Literal["float32"] = "float32"


class ClassificationOutput(_Strict):
    """Logits or probabilities ``[1, C]``; the top ``top_k`` classes are reported."""

    decoder: Literal["classification"] = "classification"
    name: str
    softmax: bool = True  # apply softmax to the output (false when the graph already does)
    top_k: int = Field(default=3, ge=1)


class YoloOutput(_Strict):
    """The Ultralytics YOLOv8/11 ONNX export: ``[1, 4 + classes, N]`` with cx, cy, w, h in input pixels."""

    decoder: Literal["yolo"] = "yolo"
    name: str
    score_threshold: float = Field(default=0.25, ge=0, le=1)
    iou_threshold: float = Field(default=0.45, ge=0, le=1)
    max_detections: int = Field(default=100, ge=1)


class BoxesOutput(_Strict):
    """Separate outputs: boxes ``[1, N, 4]``, scores ``[1, N]``, classes ``[1, N]``."""

    decoder: Literal["boxes_scores_classes"] = "boxes_scores_classes"
    boxes: str
    scores: str
    classes: str
    box_format: Literal["xyxy", "yxyx", "cxcywh"] = "xyxy"
    normalized: bool = True  # coordinates in 0..1 of the model input, else input pixels
    score_threshold: float = Field(default=0.25, ge=0, le=1)


class ScoreOutput(_Strict):
    """A single anomaly (or regression) score ``[1, 1]`` or ``[1]``."""

    decoder: Literal["score"] = "score"
    name: str


Output = Annotated[
    ClassificationOutput | YoloOutput | BoxesOutput | ScoreOutput, Field(discriminator="decoder")
]
Input = Annotated[ImageInput | VectorInput, Field(discriminator="kind")]

_TASK_DECODERS = {
    "classification": {"classification"},
    "detection": {"yolo", "boxes_scores_classes"},
    "anomaly": {"score"},
    "regression": {"score"},
}


class ModelCard(_Strict):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    task: Literal["classification", "detection", "anomaly", "regression"]
    input: Input
    output: Output
    labels: list[str] = Field(default_factory=list)
    memory_mb: int | None = Field(default=None, gt=0)  # estimated resident memory of one session
    licence: str | None = None
    description: str = ""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.output.decoder not in _TASK_DECODERS[self.task]:
            allowed = ", ".join(sorted(_TASK_DECODERS[self.task]))
            raise ValueError(
                f"task {self.task!r} cannot use output decoder {self.output.decoder!r} (use one of: {allowed})"
            )
        image_task = self.task in ("classification", "detection")
        if image_task and self.input.kind != "image":
            raise ValueError(f"task {self.task!r} needs an image input")
        if not image_task and self.input.kind != "vector":
            raise ValueError(f"task {self.task!r} needs a vector input")
        if image_task and not self.labels:
            raise ValueError(f"task {self.task!r} needs labels (one per class)")
        return self

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def output_names(self) -> list[str]:
        out = self.output
        if isinstance(out, BoxesOutput):
            return [out.boxes, out.scores, out.classes]
        return [out.name]

    def label(self, index: int) -> str:
        """The label of class ``index``; an unknown index reads as ``class_N`` rather than failing."""
        return self.labels[index] if 0 <= index < len(self.labels) else f"class_{index}"

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        return load_json_document(cls, path)

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ModelCard:
        return parse_json_document(cls, raw, where)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def package_files(path: Path) -> tuple[Path, Path]:
    """``model.onnx`` and ``model.json`` of a model package: a folder (or a file in it). Raises
    :class:`FormatError` naming what is missing."""
    folder = path.parent if path.is_file() else path
    onnx_path, card_path = folder / "model.onnx", folder / "model.json"
    if not folder.is_dir():
        raise FormatError(f"{path}: no such model package; give the folder holding model.onnx and model.json")
    missing = [p.name for p in (onnx_path, card_path) if not p.is_file()]
    if missing:
        raise FormatError(f"{folder}: missing {' and '.join(missing)}; a model package is a folder with "
                          "model.onnx and model.json")
    return onnx_path, card_path
