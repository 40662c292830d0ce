"""The demo models, run by real ONNX Runtime (CPU) on the synthetic scene (``models``: see conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from appliance.demo import modelgen
from appliance.demo.scene import object_positions, render_frame
from appliance.runtime.processing import decode_image, decode_outputs, preprocess_image, vector_from_telemetry
from appliance.runtime.results import Detection
from formats.model_card import ImageInput, ModelCard, VectorInput

# (t, camera): helmet worn in even 5 s periods, so these cover both, all three paths and the frame edges
FRAMES = [(0.0, 0), (3.0, 1), (7.0, 2), (12.5, 1), (16.0, 0), (40.0, 0), (41.3, 2), (58.9, 1)]


class Model:
    """A built demo model with its card and a real CPU session."""

    def __init__(self, directory: Path) -> None:
        self.card = ModelCard.load(directory / "model.json")
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])

    def detect(self, data: bytes) -> list[Detection]:
        spec = self.card.input
        assert isinstance(spec, ImageInput)
        tensor, transform = preprocess_image(decode_image(data), spec)
        names = self.card.output_names()
        raw = self.session.run(names, {spec.name: tensor})
        return decode_outputs(self.card, dict(zip(names, raw)), transform)

    def score(self, values: dict[str, float]) -> list[Detection]:
        spec = self.card.input
        assert isinstance(spec, VectorInput)
        names = self.card.output_names()
        raw = self.session.run(names, {spec.name: vector_from_telemetry(values, spec)})
        return decode_outputs(self.card, dict(zip(names, raw)), None)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _assert_matches_truth(found: list[Detection], t: float, camera: int, width: int, height: int) -> None:
    truth = {
        label: (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        for label, box in object_positions(t, camera, width, height).items()
        if box is not None
    }
    assert sorted(d.label for d in found) == sorted(truth), (t, camera, found)
    for d in found:
        assert d.box is not None
        assert d.score > 0.8, (t, camera, d)
        assert _iou(d.box, truth[d.label]) > 0.5, (t, camera, d, truth[d.label])


def test_build_all_writes_valid_models_and_cards(models: dict[str, Path]) -> None:
    assert set(models) == {"demo-detector", "demo-boxes", "demo-classifier", "demo-classifier-batch",
                           "demo-gas-anomaly", "demo-hang", "demo-load-hang"}
    for name, directory in models.items():
        card = ModelCard.load(directory / "model.json")
        assert card.name == name
        model = onnx.load(str(directory / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == modelgen.OPSET
        assert [i.name for i in model.graph.input] == [card.input.name]
        assert sorted(o.name for o in model.graph.output) == sorted(card.output_names())


@pytest.mark.parametrize("name", ["demo-detector", "demo-boxes"])
def test_detectors_find_the_scene_objects(models: dict[str, Path], name: str) -> None:
    model = Model(models[name])
    for t, camera in FRAMES:
        _assert_matches_truth(model.detect(render_frame(t, camera)), t, camera, 640, 480)


@pytest.mark.parametrize("name", ["demo-detector", "demo-boxes"])
def test_detectors_work_on_a_wide_frame(models: dict[str, Path], name: str) -> None:
    model = Model(models[name])
    for t, camera in FRAMES[:3]:
        _assert_matches_truth(model.detect(render_frame(t, camera, 1280, 720)), t, camera, 1280, 720)


def test_detector_finds_nothing_in_an_empty_yard(models: dict[str, Path]) -> None:
    rng = np.random.default_rng(3)
    yard = rng.normal(60, 12, (480, 640, 3)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(yard).save(out, format="JPEG", quality=80)
    assert Model(models["demo-detector"]).detect(out.getvalue()) == []


@pytest.mark.parametrize(
    ("colour", "label"), [((220, 30, 40), "red"), ((20, 200, 60), "green"), ((10, 40, 230), "blue")]
)
def test_classifier_names_the_dominant_colour(
    models: dict[str, Path], colour: tuple[int, int, int], label: str
) -> None:
    out = io.BytesIO()
    Image.new("RGB", (200, 120), colour).save(out, format="PNG")
    found = Model(models["demo-classifier"]).detect(out.getvalue())
    assert (found[0].label, found[0].score > 0.9) == (label, True)
    assert len(found) == 3 and all(d.box is None for d in found)


def test_anomaly_scores_normal_low_and_gas_spike_high(models: dict[str, Path]) -> None:
    model = Model(models["demo-gas-anomaly"])
    normal = model.score({"ch4": 0.6, "temp": 26.0})
    spike = model.score({"ch4": 2.0, "temp": 25.0})
    assert [d.label for d in normal] == ["anomaly"]
    assert normal[0].score < 2
    assert spike[0].score > 5


def test_hang_model_builds_small_and_loads(models: dict[str, Path]) -> None:
    """Only loaded, never run: a run would not finish."""
    path = models["demo-hang"] / "model.onnx"
    assert path.stat().st_size < 4096
    model = onnx.load(str(path))
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == 1 and loops[0].output[0] == "logits"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_main_builds_into_the_given_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert modelgen.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(modelgen.BUILDERS)
    for line in printed:
        name, directory = line.split("\t")
        assert Path(directory) == tmp_path / name
        assert (tmp_path / name / "model.onnx").is_file()
    assert modelgen.main([]) == 2
