"""A model graph's interface, read from ONNX, and the ways a model card disagrees with it.

Shared by the appliance (``appliance models add``) and the AppStore (``appstore publish model``), so that
the AppStore refuses exactly the packages an appliance would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.errors import FormatError
from formats.model_card import BoxesOutput, ClassificationOutput, ImageInput, ModelCard, YoloOutput

_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a str is a symbolic dimension

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name!r} {self.dtype} [{dims}]"


@dataclass(frozen=True, slots=True)
class GraphInfo:
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


def inspect_graph(data: bytes, where: str) -> GraphInfo:
    """Read the graph's interface; raise :class:`FormatError` if ``data`` is not a valid ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{where} is not a valid ONNX model ({first}); export it again from the training tool") from e

    def info(v: onnx.ValueInfoProto) -> TensorInfo:
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorInfo(v.name, _DTYPES.get(t.elem_type, f"type{t.elem_type}"), shape)

    initializers = {i.name for i in model.graph.initializer}
    return GraphInfo(
        inputs={v.name: info(v) for v in model.graph.input if v.name not in initializers},
        outputs={v.name: info(v) for v in model.graph.output},
    )


def check_card(card: ModelCard, graph: GraphInfo) -> list[str]:
    """Every way the card disagrees with the graph, each in one sentence."""
    problems: list[str] = []
    graph_inputs = ", ".join(t.describe() for t in graph.inputs.values()) or "none"
    spec = card.input
    tensor = graph.inputs.get(spec.name)
    if tensor is None:
        problems.append(f"card input {spec.name!r} is not an input of the graph (graph inputs: {graph_inputs})")
    else:
        if tensor.dtype != spec.dtype:
            problems.append(f"input {spec.name!r}: card says {spec.dtype}, graph has {tensor.dtype}")
        if isinstance(spec, ImageInput):
            if len(tensor.shape) != 4:
                problems.append(f"input {spec.name!r}: an image input needs rank 4, graph has {tensor.describe()}")
            else:
                want = (3, spec.height, spec.width) if spec.layout == "NCHW" else (spec.height, spec.width, 3)
                axes = ("channels", "height", "width") if spec.layout == "NCHW" else ("height", "width", "channels")
                for axis, w, g in zip(axes, want, tensor.shape[1:]):
                    if isinstance(g, int) and g != w:
                        problems.append(f"input {spec.name!r}: card ({spec.layout}) gives {axis} {w}, "
                                        f"graph has {g} ({tensor.describe()})")
        else:
            if len(tensor.shape) != 2:
                problems.append(f"input {spec.name!r}: a feature vector needs rank 2 [1, F], graph has {tensor.describe()}")
            elif isinstance(tensor.shape[1], int) and tensor.shape[1] != len(spec.features):
                problems.append(f"input {spec.name!r}: card lists {len(spec.features)} features, "
                                f"graph takes {tensor.shape[1]}")
    extra = [n for n in graph.inputs if n != spec.name]
    if extra:
        problems.append(f"graph needs inputs the card does not feed: {', '.join(extra)}")
    graph_outputs = ", ".join(t.describe() for t in graph.outputs.values())
    for name in card.output_names():
        if name not in graph.outputs:
            problems.append(f"card output {name!r} is not an output of the graph (graph outputs: {graph_outputs})")
    out = card.output
    if isinstance(out, YoloOutput) and out.name in graph.outputs:
        shape = graph.outputs[out.name].shape
        if len(shape) != 3:
            problems.append(f"output {out.name!r}: the yolo decoder needs [1, 4+classes, N], graph has rank {len(shape)}")
        elif isinstance(shape[1], int) and shape[1] != 4 + len(card.labels):
            problems.append(f"output {out.name!r}: {len(card.labels)} labels need {4 + len(card.labels)} rows "
                            f"(4 box + 1 per class), graph has {shape[1]}")
    if isinstance(out, ClassificationOutput) and out.name in graph.outputs:
        shape = graph.outputs[out.name].shape
        if shape and isinstance(shape[-1], int) and shape[-1] != len(card.labels):
            problems.append(f"output {out.name!r}: card has {len(card.labels)} labels, graph gives {shape[-1]} classes")
    if isinstance(out, BoxesOutput) and out.boxes in graph.outputs:
        shape = graph.outputs[out.boxes].shape
        if shape and isinstance(shape[-1], int) and shape[-1] != 4:
            problems.append(f"output {out.boxes!r}: boxes need 4 coordinates in the last axis, graph has {shape[-1]}")
    return problems


def card_problems(card: ModelCard, data: bytes, where: str) -> list[str]:
    """``check_card`` on the graph in ``data``; raises :class:`FormatError` if it is not ONNX at all."""
    return check_card(card, inspect_graph(data, where))
