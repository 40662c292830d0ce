"""Partitions for real on this machine's CPU cores, admission, GPU plans from recorded inventories, hot swap."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.demo.scene import render_frame
from tests.conftest import DaemonFactory, Publisher, counter, wait_until, write_app
from tests.test_e2e import PERSON_RULE, serving

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"


def partition_of(d: Any, name: str) -> dict[str, Any]:
    return next(p for p in d.status()["partitions"] if p["name"] == name)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores")
def test_two_cpu_partitions_pinned_to_their_cores(make_daemon: DaemonFactory, models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    core_a, core_b = sorted(os.sched_getaffinity(0))[:2]
    d = make_daemon(start=False, extra=f"""
        [[partitions]]
        name = "left"
        device = "cpu"
        cores = [{core_a}]
        [[partitions]]
        name = "right"
        device = "cpu"
        cores = [{core_b}]
        [placement.pins]
        ppe = "left"
        colours = "right"
        """)
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("models", "add", str(models["demo-classifier"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.cli("apps", "add", str(write_app(tmp_path / "b.json", "colours", "demo-classifier", ["cameras/+/frame"],
                                       [{"name": "red", "labels": ["red"], "min_score": 0.99}])))
    d.start()
    wait_until(lambda: serving(d, "ppe", "colours"), 30, what="both apps serving")
    workers = {w["partition"]: w["pid"] for w in d.status()["workers"]}
    assert {w["partition"]: w["threads"] for w in d.status()["workers"]} == {"left": 1, "right": 1}
    assert os.sched_getaffinity(workers["left"]) == {core_a}, "the left worker is pinned to its core"
    assert os.sched_getaffinity(workers["right"]) == {core_b}, "the right worker is pinned to its core"
    apps = {a["name"]: a["partition"] for a in d.status()["apps"]}
    assert apps == {"ppe": "left", "colours": "right"}
    models_at = {m["key"]: m["partition"] for m in d.status()["models"]}
    assert models_at == {"demo-detector@1.0.0": "left", "demo-classifier@1.0.0": "right"}
    pub = Publisher(d.mqtt_port)
    try:
        for i in range(5):
            pub.publish("cameras/cam1/frame", render_frame(i, 0))
            wait_until(lambda i=i: (s := d.source("cam1")) and s["processed"] == i + 1, 20, what=f"frame {i}")
    finally:
        pub.close()
    metrics = d.metrics()
    for name in ("left", "right"):
        assert counter(metrics, "appliance_partition_inferences_total", partition=name) == 5, f"{name} ran each frame"
    left = wait_until(lambda: (p := partition_of(d, "left"))["utilisation_percent"] is not None and p, 20,
                      what="a utilisation reading of the left partition")
    assert 0 <= left["utilisation_percent"] <= 100 and "of its cores" in left["utilisation_note"]
    text = d.cli("status").stdout
    assert "left" in text and "right" in text and f"cores {core_a}" in text and "utilisation" in text


def _nice(pid: int, tid: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19 of stat; the text after ")" starts at 3


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores")
@pytest.mark.parametrize("runtime", ["", "executors = 1", "lone_frame_all_cores = false"])
def test_a_cpu_partition_runs_a_frame_per_core_a_lone_frame_on_every_core_and_loads_at_low_priority(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path, runtime: str) -> None:
    """By default one executor per core, each running its frames on its own core (no thread pool), while a
    frame that has the worker to itself runs on every core (a second session of the model, whose thread pool
    serves at full priority); the loader thread is niced so that a model being loaded yields the cores to
    those serving. An operator who asks for one executor gets every core as intra-op threads for every frame
    (and no niced loader: the pool's threads would inherit its priority); one who turns the lone-frame
    session off saves its memory and a lone frame runs on one core."""
    cores = len(os.sched_getaffinity(0))
    d = make_daemon(start=False, extra=f"[runtime]\n{runtime}\n")
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.start()
    wait_until(lambda: serving(d, "ppe"), 30, what="the app serving")
    [worker] = d.status()["workers"]
    pid = worker["pid"]
    niced = sorted(_nice(pid, tid) - _nice(pid, str(pid)) for tid in os.listdir(f"/proc/{pid}/task"))
    expected = {"": (cores, 1, cores), "executors = 1": (1, cores, 0), "lone_frame_all_cores = false": (cores, 1, 0)}
    assert (worker["executors"], worker["threads"], worker["alone_threads"]) == expected[runtime]
    if worker["threads"] == 1:
        # the loader, and the pool of the lone-frame session it made (a thread per core but the caller's)
        pool = worker["alone_threads"] - 1 if worker["alone_threads"] else 0
        assert niced.count(10) == 1 + pool and set(niced) <= {0, 10}, f"only the loader is niced: {niced}"
    else:
        assert set(niced) == {0}, f"nothing niced: {niced}"
    pub = Publisher(d.mqtt_port)
    try:
        for i in range(3):  # one camera, one frame at a time
            pub.publish("cameras/cam1/frame", render_frame(i, 0))
            wait_until(lambda i=i: (s := d.source("cam1")) and s["processed"] == i + 1, 20, what=f"frame {i}")
        alone = counter(d.metrics(), "appliance_frames_alone_total")
        assert alone == (3 if worker["alone_threads"] else 0), "each lone frame ran on every core, where enabled"
        for i in range(8):  # eight cameras at once: frames side by side, one per core
            pub.client.publish(f"cameras/burst{i}/frame", render_frame(i, i % 8), qos=0)
        wait_until(lambda: sum((s := d.source(f"burst{i}")) is not None and s["processed"] + s["skipped"] >= 1
                               for i in range(8)) == 8, 30, what="every burst frame answered")
        processed = sum((d.source(f"burst{i}") or {}).get("processed", 0) for i in range(8))
        burst_alone = counter(d.metrics(), "appliance_frames_alone_total") - alone
        if worker["alone_threads"]:
            assert processed > burst_alone, "frames in flight together ran side by side, not all on every core"
        else:
            assert burst_alone == 0
    finally:
        pub.close()


def test_deployment_that_does_not_fit_is_refused_before_anything_changes(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False, extra="""
        [[partitions]]
        name = "small"
        device = "cpu"
        memory_mb = 300
        """)
    d.cli("models", "add", str(models["demo-detector"]))
    ok = write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"], [PERSON_RULE])
    d.cli("apps", "add", str(ok))
    big = json.loads(ok.read_text())
    big["name"], big["resources"] = "big", {"memory_mb": 2048}
    (tmp_path / "big.json").write_text(json.dumps(big))
    r = d.cli("apps", "add", str(tmp_path / "big.json"), check=False)
    assert r.returncode == 2
    assert "needs 2048 MB" in r.stderr and "small" in r.stderr and "300 MB" in r.stderr, r.stderr
    listed = d.cli("apps", "list").stdout
    assert "ppe" in listed and "big" not in listed


def test_gpu_partition_that_falls_back_to_cpu_is_an_error_not_a_slowdown(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    """Planned from a recorded T4 inventory; this machine has no GPU, so ONNX Runtime falls back to the CPU."""
    d = make_daemon(start=False, extra=f"""
        [hardware]
        inventory_file = "{FIXTURES / 't4-single.json'}"
        """)
    hardware = d.cli("hardware").stdout
    assert "T4" in hardware and "gpu0" in hardware and "CUDA_VISIBLE_DEVICES=0" in hardware
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "ppe", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    d.start()
    gpu = wait_until(lambda: (p := partition_of(d, "gpu0"))["error"] and p, 60, what="fallback reported")
    assert "CUDAExecutionProvider" in gpu["error"] and gpu["apps"] == ["ppe"]
    assert gpu["env"]["CUDA_VISIBLE_DEVICES"] == "0" and gpu["provider"] == "CUDAExecutionProvider"
    assert gpu["utilisation_percent"] == 37, "utilisation comes through the NVML seam (recorded here)"
    assert counter(d.metrics(), "appliance_partition_gpu_utilisation_percent", partition="gpu0") == 37
    app = next(a for a in d.status()["apps"] if a["name"] == "ppe")
    assert app["state"] == "degraded" and "CPUExecutionProvider" in app["reason"]
    assert "ERROR: fell back from CUDAExecutionProvider" in d.cli("status").stdout


def test_hot_swap_and_rollback_under_a_running_stream_lose_nothing(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    d = make_daemon(start=False)
    v2 = shutil.copytree(models["demo-detector"], tmp_path / "detector-v2")
    card = json.loads((v2 / "model.json").read_text())
    card["version"] = "2.0.0"
    (v2 / "model.json").write_text(json.dumps(card))
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("models", "add", str(v2))
    app_v1 = write_app(tmp_path / "v1.json", "ppe", "demo-detector", ["cameras/+/frame"], [PERSON_RULE])
    app_v2 = json.loads(app_v1.read_text())
    app_v2["version"], app_v2["model"]["version"] = "2.0.0", "2.0.0"
    (tmp_path / "v2.json").write_text(json.dumps(app_v2))
    d.cli("apps", "add", str(app_v1))
    d.start()
    wait_until(lambda: serving(d, "ppe"), 30, what="app serving")

    stop = threading.Event()
    sent = 0
    frames = [render_frame(i / 10, 0) for i in range(10)]

    def stream() -> None:
        nonlocal sent
        pub = Publisher(d.mqtt_port)
        try:
            while not stop.is_set():
                pub.publish("cameras/live/frame", frames[sent % 10])
                sent += 1
                stop.wait(0.05)
        finally:
            pub.close()

    def model_now() -> str:
        return str(next(a for a in d.status()["apps"] if a["name"] == "ppe")["model"])

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        wait_until(lambda: sent > 10, 10, what="the stream running")
        d.cli("apps", "add", str(tmp_path / "v2.json"))
        wait_until(lambda: model_now() == "demo-detector@2.0.0", 30, what="swapped to v2")
        wait_until(lambda: not any(m["key"] == "demo-detector@1.0.0" for m in d.status()["models"]), 10,
                   what="v1 unloaded after the swap")
        d.cli("apps", "rollback", "ppe")
        wait_until(lambda: model_now() == "demo-detector@1.0.0", 30, what="rolled back to v1")
        mark = sent
        wait_until(lambda: sent > mark + 10, 10, what="the stream still running after the rollback")
    finally:
        stop.set()
        streamer.join()
    src = wait_until(lambda: (s := d.source("live")) and s["received"] == sent and
                     s["processed"] + s["skipped"] == sent and s, 20, what="every frame accounted for")
    assert src["rejected"] == {}, "no frame failed or was refused during the swaps"
    assert src["processed"] >= sent * 0.9, "frames were served, not dropped"
    assert "swapped demo-detector@2.0.0 -> demo-detector@1.0.0" in next(
        a for a in d.status()["apps"] if a["name"] == "ppe")["swap"]


def solid_jpeg(rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (320, 240), rgb).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_dynamic_batching_runs_frames_together_and_keeps_each_result_with_its_frame(
        make_daemon: DaemonFactory, models: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import Subscriber

    d = make_daemon(start=False, extra="""
        [runtime]
        max_batch = 4
        max_batch_delay_ms = 50
        """)
    d.cli("models", "add", str(models["demo-classifier-batch"]))
    rules = [{"name": c, "labels": [c], "min_score": 0.9, "cooldown_s": 0} for c in ("red", "green", "blue")]
    d.cli("apps", "add", str(write_app(tmp_path / "a.json", "colours", "demo-classifier-batch",
                                       ["cameras/+/frame"], rules)))
    d.start()
    wait_until(lambda: serving(d, "colours"), 30, what="app serving")
    colours = {"r": (220, 20, 20), "g": (20, 220, 20), "b": (20, 20, 220)}
    names = {"r": "red", "g": "green", "b": "blue"}
    events = Subscriber(d.mqtt_port, f"appliance/{d.device}/events")
    pub = Publisher(d.mqtt_port)
    try:
        for round_ in range(6):
            for c, rgb in colours.items():
                for k in range(2):
                    pub.client.publish(f"cameras/{c}{k}/frame", solid_jpeg(rgb), qos=0)
        pub.publish("cameras/flush/frame", solid_jpeg(colours["r"]))
        got: dict[str, set[str]] = {}
        deadline_left = 40
        while sum(len(v) for v in got.values()) < 7 and deadline_left > 0:
            e = events.next_json(20)
            got.setdefault(e["source"], set()).add(e["label"])
            deadline_left -= 1
    finally:
        pub.close()
        events.close()
    for source, labels in got.items():
        expected = "red" if source == "flush" else names[source[0]]
        assert labels == {expected}, f"{source} got {labels}: a result went to the wrong frame"
    metrics = d.metrics()
    frames = counter(metrics, "appliance_batch_size_count", model="demo-classifier-batch@1.0.0")
    alone = counter(metrics, "appliance_batch_size_bucket", model="demo-classifier-batch@1.0.0", le="1.0")
    assert frames > alone, "some frames ran in batches of more than one"


def test_hardware_shows_mig_instances_and_the_partitions_made_of_them(make_daemon: DaemonFactory) -> None:
    d = make_daemon(start=False, extra=f"""
        [hardware]
        inventory_file = "{FIXTURES / 'h100-mig7.json'}"
        """)
    out = d.cli("hardware").stdout
    assert "H100" in out and out.count("1g.10gb") >= 7
    for i in range(7):
        assert f"gpu0-mig{i}" in out
    assert out.count("CUDA_VISIBLE_DEVICES=MIG-") == 7
    inventory = json.loads(d.cli("hardware", "--json").stdout)
    assert len(inventory["gpus"][0]["mig_devices"]) == 7


def test_invalid_partitions_stop_the_daemon_with_a_message_naming_them(make_daemon: DaemonFactory) -> None:
    d = make_daemon(start=False, extra="""
        [[partitions]]
        name = "a"
        device = "cpu"
        cores = [0]
        [[partitions]]
        name = "b"
        device = "cpu"
        cores = [0]
        [[partitions]]
        name = "g"
        device = "cuda:0"
        """)
    r = d.cli("run", check=False)
    assert r.returncode == 2
    assert "partitions a and b both use core 0" in r.stderr
    assert "partition g: device cuda:0 does not exist" in r.stderr
