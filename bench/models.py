"""The benchmark model: a MobileNet-shaped classifier with seeded random weights, built with ``onnx.helper``.

Its cost is what matters, not its answers: 13 depthwise-separable blocks (27 convolutions) over a
224x224 RGB input, global average pooling and a 10-class linear head, as MobileNet v1 1.0 has: about
0.57 GMAC per frame and 3.2 M parameters. Weights are He-normal from a fixed seed, so the
same arguments always give the same bytes, and activations stay in a normal floating-point range (no
denormals to slow the CPU down)::

    path = build_bench_model(Path("/tmp/models/bench-mobilenet"))  # model.onnx + model.json
    v2 = copy_model(path, Path("/tmp/models/bench-mobilenet-v2"), version="2.0.0")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from formats.model_card import ClassificationOutput, ImageInput, ModelCard

__all__ = ["BENCH_MODEL", "INPUT_SIZE", "LABELS", "build_bench_model", "copy_model", "macs"]

BENCH_MODEL = "bench-mobilenet"
INPUT_SIZE = 224  # pixels, square
WIDTH = 1.0  # MobileNet width multiplier
SEED = 20261123
OPSET = 17
IR_VERSION = 9  # accepted by every onnxruntime the project supports (>= 1.18)
LABELS = ["person", "helmet", "vest", "vehicle", "forklift", "fire", "smoke", "spill", "ladder", "background"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (output channels at width 1.0, stride) of MobileNet v1's depthwise-separable blocks
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]
STEM = 32


def _channels(c: int, width: float) -> int:
    return max(8, int(c * width + 4) // 8 * 8)  # multiples of 8, as MobileNet rounds them


def _layers(width: float) -> list[tuple[str, int, int, int]]:
    """(kind, in channels, out channels, stride) per convolution: "full" 3x3, "dw" 3x3 depthwise, "pw" 1x1."""
    c = _channels(STEM, width)
    layers = [("full", 3, c, 2)]
    for out, stride in BLOCKS:
        o = _channels(out, width)
        layers += [("dw", c, c, stride), ("pw", c, o, 1)]
        c = o
    return layers


def macs(width: float = WIDTH, size: int = INPUT_SIZE) -> int:
    """Multiply-accumulates of one frame (convolutions and the head)."""
    total, side = 0, size
    for kind, cin, cout, stride in _layers(width):
        side = (side + stride - 1) // stride
        per_pixel = {"full": 9 * cin * cout, "dw": 9 * cout, "pw": cin * cout}[kind]
        total += per_pixel * side * side
    return total + _layers(width)[-1][2] * len(LABELS)


def build_bench_model(out_dir: Path, name: str = BENCH_MODEL, version: str = "1.0.0", width: float = WIDTH,
                      size: int = INPUT_SIZE, seed: int = SEED) -> Path:
    """Write ``model.onnx`` and ``model.json`` into ``out_dir``; returns ``out_dir``."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "images"
    for i, (kind, cin, cout, stride) in enumerate(_layers(width)):
        group = cin if kind == "dw" else 1
        k = 1 if kind == "pw" else 3
        fan_in = (cin // group) * k * k
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        b = rng.normal(0.0, 0.01, cout).astype(np.float32)  # a folded batch norm's shift
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"conv{i}"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4, group=group))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"act{i}"]))
        x = f"act{i}"
    features = _layers(width)[-1][2]
    head = rng.normal(0.0, np.sqrt(1.0 / features), (features, len(LABELS))).astype(np.float32)
    inits += [numpy_helper.from_array(head, "head_w"), numpy_helper.from_array(np.zeros(len(LABELS), np.float32), "head_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "head_w", "head_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "bench_mobilenet",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, len(LABELS)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bench.models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    params = sum(int(np.prod(t.dims)) for t in inits)
    card = ModelCard(
        name=name,
        version=version,
        task="classification",
        input=ImageInput(name="images", layout="NCHW", width=size, height=size, colour="RGB",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0 / 255.0, resize="letterbox"),
        output=ClassificationOutput(name="logits", softmax=True, top_k=3),
        labels=list(LABELS),
        memory_mb=64,
        licence="Apache-2.0",
        description=(f"Benchmark model: MobileNet v1 shape, width {width}, {size}x{size} input, {params / 1e6:.2f} M "
                     f"parameters, {macs(width, size) / 1e9:.2f} GMAC per frame; random weights (seed {seed})."),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "model.onnx"))
    (out_dir / "model.json").write_text(card.to_json() + "\n", encoding="utf-8")
    return out_dir


def copy_model(src: Path, dst: Path, name: str | None = None, version: str | None = None) -> Path:
    """A copy of the package at ``src`` under another name and/or version (same graph, same bytes)."""
    shutil.copytree(src, dst)
    card = json.loads((dst / "model.json").read_text(encoding="utf-8"))
    if name is not None:
        card["name"] = name
    if version is not None:
        card["version"] = version
    (dst / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return dst
