"""Installing model and app packages: check everything first, then change state atomically.

A model package is a folder holding ``model.onnx`` and ``model.json`` (the card). The card is
checked against the ONNX graph (input names, ranks, dtypes, fixed sizes, output names) and refused
with a message naming the disagreement. Files are copied into a content-addressed folder
(``models/<sha256>/``) under a temporary name and renamed into place, so a crash leaves the old state
or the new one, never half of one. The sha256 is recorded and checked again at every load.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from appliance.errors import InstallError
from appliance.runtime.deploy import admit_app
from appliance.runtime.partitions import PartitionPlan
from appliance.runtime.placement import AdmissionError
from appliance.store import AppRecord, ModelRecord, Store, StoreError
from formats import AppManifest, FormatError, ModelCard
from formats.model_card import BoxesOutput, ClassificationOutput, ImageInput, YoloOutput, package_files

F = TypeVar("F", bound=Callable[..., Any])

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
    """Read the graph's interface; raise InstallError if ``data`` is not a valid ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InstallError(f"{where} is not a valid ONNX model ({first}); export it again from the training tool") from e

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


def _package_files(path: Path) -> tuple[Path, Path]:
    try:
        return package_files(path)
    except FormatError as e:
        raise InstallError(str(e)) from e


def _audited_refusal(action: str) -> Callable[[F], F]:
    """Write a refused install to the audit log (who, what, why) before the error reaches the user."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(store: Store, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(store, *args, **kwargs)
            except InstallError as e:
                package = args[1] if action == "model.install" else args[0]  # (models_dir, package) or (path, ...)
                store.audit("cli", f"{action}.refused", {"package": str(package), "reason": str(e)})
                raise

        return cast(F, inner)

    return wrap


@_audited_refusal("model.install")
def install_model(store: Store, models_dir: Path, package: Path) -> ModelRecord:
    """Check and install a model package; nothing changes unless every check passes."""
    onnx_path, card_path = _package_files(package)
    try:
        card = ModelCard.load(card_path)
    except FormatError as e:
        raise InstallError(f"model card refused:\n{e}") from e
    data = onnx_path.read_bytes()
    graph = inspect_graph(data, str(onnx_path))
    problems = check_card(card, graph)
    if problems:
        raise InstallError(f"{card_path} disagrees with {onnx_path.name}:\n  " + "\n  ".join(problems))
    if store.get_model(card.name, card.version) is not None:
        raise InstallError(f"model {card.key} is already installed; remove it first "
                           f"(appliance models remove {card.name} {card.version}) or give the new one another version")
    digest = hashlib.sha256(data).hexdigest()
    final = models_dir / digest
    if not final.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=models_dir))
        try:
            (tmp / "model.onnx").write_bytes(data)
            (tmp / "model.json").write_text(card.to_json(), encoding="utf-8")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise InstallError(f"cannot write {final}: {e.strerror}") from e
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        store.add_model(card.to_json(), card.name, card.version, card.task, digest, len(data), str(final / "model.onnx"))
    except StoreError as e:
        raise InstallError(str(e)) from e
    store.audit("cli", "model.install", {"model": card.key, "sha256": digest})
    record = store.get_model(card.name, card.version)
    assert record is not None
    return record


def remove_model(store: Store, name: str, version: str) -> ModelRecord:
    try:
        record = store.remove_model(name, version)
    except StoreError as e:
        raise InstallError(str(e)) from e
    if not any(m.sha256 == record.sha256 for m in store.list_models()):
        shutil.rmtree(Path(record.path).parent, ignore_errors=True)
    store.audit("cli", "model.remove", {"model": f"{name}@{version}"})
    return record


@_audited_refusal("app.install")
def install_app(store: Store, path: Path, plans: list[PartitionPlan] | None = None,
                pins: Mapping[str, str] | None = None) -> AppRecord:
    """Check and install (or upgrade) an app; with ``plans``, refuse it unless it fits in the partitions."""
    manifest_path = path / "app.json" if path.is_dir() else path
    try:
        manifest = AppManifest.load(manifest_path)
    except FormatError as e:
        raise InstallError(f"app manifest refused:\n{e}") from e
    return _install_manifest(store, manifest, plans, pins or {})


def rollback_app(store: Store, name: str, actor: str = "cli", address: str | None = None) -> AppRecord:
    """Reinstall the manifest the app had before its last upgrade (the daemon swaps to it without a gap).

    ``actor`` and ``address`` say who asked, from where, in the audit log."""
    current = store.get_app(name)
    if current is None:
        raise InstallError(f"no app named {name!r} is installed (see: appliance apps list)")
    if current.previous_manifest_json is None:
        raise InstallError(f"app {name} has no previous version to roll back to")
    manifest = AppManifest.parse(current.previous_manifest_json.encode(), f"previous manifest of {name}")
    record = _install_manifest(store, manifest, None, {}, actor, address)
    store.audit(actor, "app.rollback", {"app": name, "from": current.version, "to": manifest.version}, address)
    return record


def _install_manifest(store: Store, manifest: AppManifest, plans: list[PartitionPlan] | None,
                      pins: Mapping[str, str], actor: str = "cli", address: str | None = None) -> AppRecord:
    model = store.get_model(manifest.model.name, manifest.model.version)
    if model is None:
        raise InstallError(f"app {manifest.key} needs model {manifest.model.key}, which is not installed; "
                           f"install it first with: appliance models add <folder with model.onnx and model.json>")
    card = ModelCard.parse(model.card_json.encode(), model.name)
    wants = "camera" if card.input.kind == "image" else "sensor"
    if manifest.source_kind != wants:
        raise InstallError(f"app {manifest.key}: model {manifest.model.key} takes {card.input.kind} input, "
                           f"so the app's sources must be {wants} topics, not {manifest.sources[0]!r}")
    unknown = {lbl for r in manifest.rules for lbl in r.labels} - set(card.labels) - (
        {"anomaly"} if card.task == "anomaly" else {"value"} if card.task == "regression" else set())
    if unknown:
        raise InstallError(f"app {manifest.key}: rules name labels the model does not have: {', '.join(sorted(unknown))} "
                           f"(model labels: {', '.join(card.labels) or 'anomaly'})")
    if plans is not None:
        try:
            admit_app(manifest, store.list_apps(), store.list_models(), plans, pins)
        except AdmissionError as e:
            raise InstallError(str(e)) from e
    try:
        store.add_app(manifest.to_json(), manifest.name, manifest.version, manifest.model.name, manifest.model.version)
    except StoreError as e:
        raise InstallError(str(e)) from e
    store.audit(actor, "app.install", {"app": manifest.key}, address)
    record = store.get_app(manifest.name)
    assert record is not None
    return record
