"""Small, real ONNX models (with their ``model.json`` cards) for the demo, the tests and benchmarks.

Each model is a hand-built graph that really does its job on the synthetic scene of
``appliance.demo.scene``; none needs downloaded weights. ``python -m appliance.demo.modelgen OUT_DIR``
writes them all, one directory per model::

    paths = build_all(Path("/tmp/models"))  # {"demo-detector": Path("/tmp/models/demo-detector"), ...}

How the detectors see: each pixel is classed red or blue by a steep sigmoid over colour differences;
averaging over 16x16 cells gives each cell's coverage, which is its score. Each cell's box is the
coverage-weighted centroid and the mass of its 7x7-cell neighbourhood, so every cell on an object
proposes nearly the same box and NMS keeps one. There is one anchor per cell and class.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.demo.scene import HELMET_SIZE, PERSON_SIZE
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
    "build_all",
    "build_anomaly",
    "build_batch_classifier",
    "build_boxes_detector",
    "build_classifier",
    "build_detector",
    "build_hang_model",
    "build_load_hang_model",
    "main",
]

OPSET = 17
IR_VERSION = 9  # accepted by every onnxruntime the project supports (>= 1.18)

DETECTOR_SIZE = 320  # input pixels, square
STRIDE = 16  # input pixels per grid cell
GRID = DETECTOR_SIZE // STRIDE  # 20 x 20 cells
WINDOW = 7  # cells on a side of the neighbourhood that measures an object's centroid and mass
DETECTOR_LABELS = ["person", "helmet"]

# per-pixel colour classifier: sigmoid(PIXEL_GAIN * (evidence - PIXEL_THRESHOLD)), evidence in 0..1 units
PIXEL_GAIN = 40.0
PIXEL_THRESHOLD = 0.35
# per-cell score: sigmoid(CELL_GAIN * (coverage - CELL_BIAS)); a cell a third covered scores > 0.9
CELL_GAIN = 20.0
CELL_BIAS = 0.15

GAS_FEATURES = ["ch4", "temp"]
GAS_MEAN = (0.5, 25.0)
GAS_STD = (0.2, 3.0)

HANG_TRIP_COUNT = 2**62  # iterations of the hang model's loop: forever, for a watchdog's purposes


def _const(name: str, value: npt.ArrayLike, dtype: type[np.generic] = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name)


def _save(out_dir: Path, graph: onnx.GraphProto, card: ModelCard) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="appliance.demo.modelgen"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "model.onnx"))
    (out_dir / "model.json").write_text(card.to_json() + "\n", encoding="utf-8")
    return out_dir


def _image_input(name: str, size: int, batch: int | str = 1) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3, size, size])


def _anchor_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The shared detector trunk: ``images`` -> ``cx``, ``cy``, ``side`` ``[1, 1, A]`` and ``class_scores`` ``[1, C, A]``.

    Anchors are class-major: the first GRID*GRID are person proposals, the next the helmet's.
    """
    classes = len(DETECTOR_LABELS)
    anchors = classes * GRID * GRID
    colour = np.array([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]], dtype=np.float32)  # red, blue evidence
    centres = (np.arange(GRID, dtype=np.float32) + 0.5) * STRIDE
    # side of the box from the mass m (in cells): square side = STRIDE * sqrt(m); a circle's diameter is 2/sqrt(pi) of it
    side_factor = np.array([STRIDE, STRIDE * 2 / math.sqrt(math.pi)], dtype=np.float32)
    class_mask = np.zeros((1, classes, anchors), dtype=np.float32)
    for c in range(classes):
        class_mask[0, c, c * GRID * GRID : (c + 1) * GRID * GRID] = 1.0
    inits = [
        _const("pixel_w", (PIXEL_GAIN * colour).reshape(classes, 3, 1, 1)),
        _const("pixel_b", np.full(classes, -PIXEL_GAIN * PIXEL_THRESHOLD)),
        _const("window_w", np.ones((classes, 1, WINDOW, WINDOW))),
        _const("grid_x", np.broadcast_to(centres[None, :], (GRID, GRID)).reshape(1, 1, GRID, GRID)),
        _const("grid_y", np.broadcast_to(centres[:, None], (GRID, GRID)).reshape(1, 1, GRID, GRID)),
        _const("eps", 1e-3),
        _const("side_factor", side_factor.reshape(1, classes, 1, 1)),
        _const("cell_gain", CELL_GAIN),
        _const("cell_bias", -CELL_GAIN * CELL_BIAS),
        _const("flat_shape", [1, 1, anchors], np.int64),
        _const("class_mask", class_mask),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "pixel_w", "pixel_b"], ["evidence"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["evidence"], ["is_colour"]),
        helper.make_node(
            "AveragePool", ["is_colour"], ["coverage"], kernel_shape=[STRIDE, STRIDE], strides=[STRIDE, STRIDE]
        ),
        _window_sum("coverage", "mass"),
        helper.make_node("Mul", ["coverage", "grid_x"], ["coverage_x"]),
        helper.make_node("Mul", ["coverage", "grid_y"], ["coverage_y"]),
        _window_sum("coverage_x", "moment_x"),
        _window_sum("coverage_y", "moment_y"),
        helper.make_node("Add", ["mass", "eps"], ["mass_eps"]),
        helper.make_node("Div", ["moment_x", "mass_eps"], ["centre_x"]),
        helper.make_node("Div", ["moment_y", "mass_eps"], ["centre_y"]),
        helper.make_node("Sqrt", ["mass"], ["root_mass"]),
        helper.make_node("Mul", ["root_mass", "side_factor"], ["side_grid"]),
        helper.make_node("Mul", ["coverage", "cell_gain"], ["cell_scaled"]),
        helper.make_node("Add", ["cell_scaled", "cell_bias"], ["cell_logit"]),
        helper.make_node("Sigmoid", ["cell_logit"], ["cell_score"]),
        helper.make_node("Reshape", ["centre_x", "flat_shape"], ["cx"]),
        helper.make_node("Reshape", ["centre_y", "flat_shape"], ["cy"]),
        helper.make_node("Reshape", ["side_grid", "flat_shape"], ["side"]),
        helper.make_node("Reshape", ["cell_score", "flat_shape"], ["score_flat"]),
        helper.make_node("Mul", ["score_flat", "class_mask"], ["class_scores"]),
    ]
    return nodes, inits


def _window_sum(source: str, target: str) -> onnx.NodeProto:
    """Per class, the sum over the WINDOW x WINDOW cells around each cell."""
    pad = WINDOW // 2
    return helper.make_node(
        "Conv",
        [source, "window_w"],
        [target],
        kernel_shape=[WINDOW, WINDOW],
        pads=[pad] * 4,
        group=len(DETECTOR_LABELS),
    )


def _detector_input() -> ImageInput:
    return ImageInput(name="images", layout="NCHW", width=DETECTOR_SIZE, height=DETECTOR_SIZE, colour="RGB")


def _detector_description() -> str:
    return (
        f"Demo detector for the synthetic scene: red squares (person, {PERSON_SIZE:.1%} of the frame width) and "
        f"blue circles (helmet, {HELMET_SIZE:.1%}). Hand-built graph, no training."
    )


def build_detector(out_dir: Path) -> Path:
    """``demo-detector``: a YOLOv8-style detector, output ``output0`` ``[1, 4 + 2, 800]``."""
    nodes, inits = _anchor_nodes()
    anchors = len(DETECTOR_LABELS) * GRID * GRID
    nodes.append(helper.make_node("Concat", ["cx", "cy", "side", "side", "class_scores"], ["output0"], axis=1))
    graph = helper.make_graph(
        nodes,
        "demo_detector",
        [_image_input("images", DETECTOR_SIZE)],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + len(DETECTOR_LABELS), anchors])],
        inits,
    )
    card = ModelCard(
        name="demo-detector",
        version="1.0.0",
        task="detection",
        input=_detector_input(),
        output=YoloOutput(name="output0", score_threshold=0.25, iou_threshold=0.45),
        labels=list(DETECTOR_LABELS),
        memory_mb=16,
        licence="Apache-2.0",
        description=_detector_description(),
    )
    return _save(out_dir, graph, card)


def build_boxes_detector(out_dir: Path) -> Path:
    """``demo-boxes``: the same detector with NMS in the graph and three outputs, as TF/EfficientDet exports have.

    ``boxes`` ``[1, K, 4]`` normalized xyxy, ``scores`` ``[1, K]``, ``classes`` ``[1, K]`` (float).
    """
    nodes, inits = _anchor_nodes()
    inits += [
        _const("half", 0.5),
        _const("input_size", float(DETECTOR_SIZE)),
        _const("max_per_class", [10], np.int64),
        _const("nms_iou", [0.45]),
        _const("nms_score", [0.25]),
        _const("col_class", 1, np.int64),
        _const("col_box", 2, np.int64),
        _const("axis0", [0], np.int64),
    ]
    nodes += [
        helper.make_node("Mul", ["side", "half"], ["half_side"]),
        helper.make_node("Sub", ["cx", "half_side"], ["x1_px"]),
        helper.make_node("Sub", ["cy", "half_side"], ["y1_px"]),
        helper.make_node("Add", ["cx", "half_side"], ["x2_px"]),
        helper.make_node("Add", ["cy", "half_side"], ["y2_px"]),
        helper.make_node("Concat", ["x1_px", "y1_px", "x2_px", "y2_px"], ["corners_px"], axis=1),
        helper.make_node("Div", ["corners_px", "input_size"], ["corners"]),
        helper.make_node("Transpose", ["corners"], ["all_boxes"], perm=[0, 2, 1]),  # [1, A, 4]
        # NMS is symmetric in x and y, so xyxy boxes work with center_point_box=0 (yxyx)
        helper.make_node(
            "NonMaxSuppression",
            ["all_boxes", "class_scores", "max_per_class", "nms_iou", "nms_score"],
            ["selected"],
            center_point_box=0,
        ),
        helper.make_node("Gather", ["selected", "col_box"], ["box_index"], axis=1),
        helper.make_node("Gather", ["all_boxes", "box_index"], ["boxes"], axis=1),
        helper.make_node("GatherND", ["class_scores", "selected"], ["selected_scores"]),
        helper.make_node("Unsqueeze", ["selected_scores", "axis0"], ["scores"]),
        helper.make_node("Gather", ["selected", "col_class"], ["class_index"], axis=1),
        helper.make_node("Cast", ["class_index"], ["class_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["class_float", "axis0"], ["classes"]),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_boxes",
        [_image_input("images", DETECTOR_SIZE)],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, "detections", 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "detections"]),
            helper.make_tensor_value_info("classes", TensorProto.FLOAT, [1, "detections"]),
        ],
        inits,
    )
    card = ModelCard(
        name="demo-boxes",
        version="1.0.0",
        task="detection",
        input=_detector_input(),
        output=BoxesOutput(boxes="boxes", scores="scores", classes="classes", box_format="xyxy", normalized=True),
        labels=list(DETECTOR_LABELS),
        memory_mb=16,
        licence="Apache-2.0",
        description=_detector_description() + " Non-maximum suppression inside the graph.",
    )
    return _save(out_dir, graph, card)


def _colour_logits() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``input`` -> ``colour_logits`` ``[1, 3]``: how much each channel stands above the others."""
    weights = 10.0 * (np.eye(3, dtype=np.float32) - 1.0 / 3.0)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["mean_colour"]),
        helper.make_node("Flatten", ["mean_colour"], ["mean_flat"], axis=1),
        helper.make_node("Gemm", ["mean_flat", "colour_w", "colour_b"], ["colour_logits"]),
    ]
    return nodes, [_const("colour_w", weights), _const("colour_b", np.zeros(3))]


def _classifier_card(name: str, description: str) -> ModelCard:
    return ModelCard(
        name=name,
        version="1.0.0",
        task="classification",
        input=ImageInput(name="input", width=64, height=64, resize="stretch"),
        output=ClassificationOutput(name="logits", softmax=True, top_k=3),
        labels=["red", "green", "blue"],
        memory_mb=8,
        licence="Apache-2.0",
        description=description,
    )


def build_classifier(out_dir: Path, name: str = "demo-classifier", batch: int | str = 1) -> Path:
    """``demo-classifier``: the dominant colour of the image, ``logits`` ``[batch, 3]`` for red, green, blue.

    With a symbolic ``batch`` (e.g. ``"N"``) the appliance can run several frames through it at once.
    """
    nodes, inits = _colour_logits()
    nodes.append(helper.make_node("Identity", ["colour_logits"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "demo_classifier",
        [_image_input("input", 64, batch)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    return _save(out_dir, graph, _classifier_card(name, "Dominant colour of the frame."))


def build_batch_classifier(out_dir: Path) -> Path:
    """``demo-classifier-batch``: the classifier with a dynamic first axis, for dynamic batching."""
    return build_classifier(out_dir, "demo-classifier-batch", "N")


def build_anomaly(out_dir: Path) -> Path:
    """``demo-gas-anomaly``: ``score`` ``[1, 1]`` = the largest |x - mean| / std over the gas sensor's channels."""
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        helper.make_node("Abs", ["z"], ["abs_z"]),
        helper.make_node("ReduceMax", ["abs_z"], ["score"], axes=[1], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "demo_gas_anomaly",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, len(GAS_FEATURES)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
        [_const("mean", [GAS_MEAN]), _const("std", [GAS_STD])],
    )
    card = ModelCard(
        name="demo-gas-anomaly",
        version="1.0.0",
        task="anomaly",
        input=VectorInput(name="features", features=list(GAS_FEATURES)),
        output=ScoreOutput(name="score"),
        memory_mb=4,
        licence="Apache-2.0",
        description=(
            f"Largest z-score over {', '.join(GAS_FEATURES)} (mean {GAS_MEAN}, std {GAS_STD}): "
            "below 2 is normal, a methane spike scores above 5."
        ),
    )
    return _save(out_dir, graph, card)


def build_hang_model(out_dir: Path, name: str = "demo-hang", on_blank: bool = False,
                     trip_count: int = HANG_TRIP_COUNT) -> Path:
    """``demo-hang``: a colour classifier whose logits go through a Loop of 2**62 steps on any real frame.

    For testing the worker watchdog. The loop runs only when some pixel is above zero, so the model loads and
    warms up (on zeros) like a healthy one and hangs on the first real frame; it depends on the input, so no
    optimiser can fold it at load. A smaller ``trip_count`` makes a model that is slow but finishes.
    """
    nodes, inits = _colour_logits()
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["carried", "step"], ["carried_out"]),
        ],
        "hang_body",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, [1, 3]),
        ],
        [_const("step", 0.0)],
    )
    inits += [_const("trip_count", trip_count, np.int64), _const("zero", 0.0)]
    nodes += [
        helper.make_node("ReduceMax", ["input"], ["brightest"], keepdims=0),
        # on_blank: hang on an all-zero image (the warm-up at load) instead of on real frames
        helper.make_node("LessOrEqual" if on_blank else "Greater", ["brightest", "zero"], ["keep_going"]),
    ]
    nodes.append(helper.make_node("Loop", ["trip_count", "keep_going", "colour_logits"], ["logits"], body=body))
    graph = helper.make_graph(
        nodes,
        "demo_hang",
        [_image_input("input", 64)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    return _save(out_dir, graph, _classifier_card(name, "Never finishes a run: for testing the watchdog."))


def build_load_hang_model(out_dir: Path) -> Path:
    """``demo-load-hang``: hangs in its warm-up run at load, for testing the load watchdog."""
    return build_hang_model(out_dir, "demo-load-hang", on_blank=True)


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "demo-detector": build_detector,
    "demo-boxes": build_boxes_detector,
    "demo-classifier": build_classifier,
    "demo-classifier-batch": build_batch_classifier,
    "demo-gas-anomaly": build_anomaly,
    "demo-hang": build_hang_model,
    "demo-load-hang": build_load_hang_model,
}


def build_all(out_dir: Path) -> dict[str, Path]:
    """Build every demo model into ``out_dir/<name>/``; returns name -> directory."""
    return {name: build(out_dir / name) for name, build in BUILDERS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m appliance.demo.modelgen OUT_DIR", file=sys.stderr)
        return 2
    for name, path in build_all(Path(args[0])).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
