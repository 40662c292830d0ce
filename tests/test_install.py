"""Installing models and apps through the CLI: every refusal is precise and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonFactory, write_app


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_install_list_remove_model_and_app(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False)
    out = d.cli("models", "add", str(models["demo-detector"])).stdout
    assert "installed model demo-detector 1.0.0" in out
    assert "demo-detector" in d.cli("models", "list").stdout
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [{"name": "r", "labels": ["person"]}])))
    assert "ppe" in d.cli("apps", "list").stdout
    r = d.cli("models", "remove", "demo-detector", "1.0.0", check=False)
    assert r.returncode == 2 and "ppe" in r.stderr, "a model in use is not removed"
    d.cli("apps", "remove", "ppe")
    d.cli("models", "remove", "demo-detector", "1.0.0")
    assert "no models installed" in d.cli("models", "list").stdout


def test_file_that_is_not_onnx_is_refused(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-gas-anomaly"]))
    bad = copy_model(models["demo-detector"], tmp_path / "bad")
    (bad / "model.onnx").write_bytes(b"PK\x03\x04 this is a zip, not a model")
    r = d.cli("models", "add", str(bad), check=False)
    assert r.returncode == 2
    assert "is not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr
    from appliance.store import Store

    with Store(d.state_dir / "appliance.db") as store:
        refused = [a for a in store.audit_log.recent(10) if a.action == "model.install.refused"]
    assert refused and "not a valid ONNX model" in str(refused[0].detail["reason"]), "refusals are audited"
    listed = d.cli("models", "list").stdout
    assert "demo-gas-anomaly" in listed and "demo-detector" not in listed


def test_card_that_disagrees_with_the_graph_is_refused(make_daemon: DaemonFactory, models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    d = make_daemon(start=False)
    bad = copy_model(models["demo-detector"], tmp_path / "bad")
    card = json.loads((bad / "model.json").read_text())
    card["input"]["name"] = "pixels"
    card["input"]["width"] = 640
    card["labels"] = ["person", "helmet", "vest"]
    (bad / "model.json").write_text(json.dumps(card))
    r = d.cli("models", "add", str(bad), check=False)
    assert r.returncode == 2
    assert "card input 'pixels' is not an input of the graph" in r.stderr and "'images'" in r.stderr
    assert "3 labels need 7 rows" in r.stderr
    wrong_size = copy_model(models["demo-detector"], tmp_path / "size")
    card = json.loads((wrong_size / "model.json").read_text())
    card["input"]["width"] = 640
    (wrong_size / "model.json").write_text(json.dumps(card))
    r = d.cli("models", "add", str(wrong_size), check=False)
    assert r.returncode == 2 and "width 640, graph has 320" in r.stderr
    assert "no models installed" in d.cli("models", "list").stdout


def test_card_with_unknown_key_is_refused(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False)
    bad = copy_model(models["demo-detector"], tmp_path / "bad")
    card = json.loads((bad / "model.json").read_text())
    card["lables"] = card.pop("labels")
    (bad / "model.json").write_text(json.dumps(card))
    r = d.cli("models", "add", str(bad), check=False)
    assert r.returncode == 2 and "lables: unknown key" in r.stderr


def test_app_naming_a_missing_model_is_refused(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    d = make_daemon(start=False)
    app = write_app(tmp_path / "a.json", "ppe", "no-such-model", ["cameras/+/frame"], [{"name": "r"}])
    r = d.cli("apps", "add", str(app), check=False)
    assert r.returncode == 2 and "no-such-model@1.0.0" in r.stderr and "appliance models add" in r.stderr
    assert "no apps installed" in d.cli("apps", "list").stdout


def test_tampered_model_file_is_not_loaded(make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import wait_until

    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [{"name": "r", "labels": ["person"]}])))
    installed = next((d.state_dir / "models").glob("*/model.onnx"))
    installed.write_bytes(installed.read_bytes() + b"\0")
    d.start()
    model = wait_until(lambda: next((m for m in d.status()["models"] if m["state"] == "failed"), None), 30,
                       what="model refused at load")
    assert "has changed since install" in model["reason"]
    app = d.status()["apps"][0]
    assert app["state"] == "degraded" and "changed since install" in app["reason"]


def test_staging_folders_of_killed_installs_are_removed_and_live_ones_kept(make_daemon: DaemonFactory,
                                                                          models: dict[str, Path]) -> None:
    """A killed `appliance models add` leaves models/.install-*: the next install and the next start remove it;
    a folder of an install still running (its process lives) is left alone."""
    d = make_daemon(start=False)
    models_dir = d.state_dir / "models"

    def left_by(pid: int, name: str) -> Path:
        folder = models_dir / f".install-{pid}-{name}"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"\0" * 1_000_000)  # half a model, never renamed into place
        return folder

    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()  # its pid is free now, like that of a killed install
    stale, live = left_by(killed.pid, "a1"), left_by(os.getpid(), "b2")
    d.cli("models", "add", str(models["demo-detector"]))
    assert not stale.exists(), "an install tidies what a killed one left"
    assert live.exists(), "an install that is still running keeps its folder"
    again = left_by(killed.pid, "c3")
    d.start()
    assert not again.exists(), "the daemon tidies at start"
    assert live.exists()
    assert "left by an install that did not finish" in d.log()
