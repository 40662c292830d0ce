"""Hard samples: the capture policy, the spool's quota, redaction, and the uploader against the real inbox.

Real SQLite, real files, real JPEGs, and the reference AppStore's inbox over real HTTP on loopback.
"""

from __future__ import annotations

import io
import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from appliance.demo.scene import render_frame
from appliance.events import frame_file
from appliance.runtime.results import Detection
from appliance.samples.capture import SampleCapture
from appliance.samples.policy import Chooser
from appliance.samples.redact import redact
from appliance.samples.spool import Spool
from appliance.samples.uploader import Uploader
from appliance.settings import SamplesSettings
from appliance.store import EventRecord, Store
from appstore.server import build_app
from appstore_client.connection import Connection, ConnectionOptions
from appstore_client.errors import Refused
from appstore_client.fleet import FleetClient
from formats.app_manifest import AppManifest, SamplePolicyOverride
from formats.sample import Prediction
from tests.conftest import DaemonFactory, Publisher, free_port, wait_until
from tests.test_appstore import ok
from tests.test_sync import Shop, make_shop

FRAME = render_frame(0.0, 0)


def manifest(**samples: object) -> AppManifest:
    return AppManifest.model_validate({
        "schema": 1, "name": "ppe-watch", "version": "1.0.0", "model": {"name": "demo-detector", "version": "1.0.0"},
        "sources": ["cameras/+/frame"], "rules": [{"name": "r", "labels": ["person"], "min_score": 0.5}],
        "samples": samples})


def det(label: str, score: float) -> Detection:
    return Detection(label=label, score=score, box=(0.25, 0.25, 0.5, 0.75))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "appliance.db") as s:
        yield s


def spool(store: Store, tmp_path: Path, **settings: object) -> Spool:
    return Spool(store, SamplesSettings.model_validate(settings), tmp_path / "samples", "dev-1")


def keep(s: Spool, reason: str, source: str = "cam1") -> str | None:
    return s.capture(app="ppe-watch", app_version="1.0.0", model="demo-detector@1.0.0", source=source,
                     reason=reason, frame=FRAME, predictions=[det("person", 0.52).prediction()])


# ------------------------------------------------------------------ policy


def test_near_threshold_class_and_random_with_limits_and_dedup() -> None:
    chooser = Chooser({})
    app = manifest(near_threshold=0.05, per_minute=2, dedup_s=10)
    assert chooser.choose(app, "cam1", [det("person", 0.9)], now=0) is None, "confident: not a hard sample"
    assert chooser.choose(app, "cam1", [det("person", 0.53)], now=0) == ("near_threshold", "person")
    assert chooser.choose(app, "cam1", [det("person", 0.48)], now=5) is None, "same source and label: de-duplicated"
    assert chooser.choose(app, "cam2", [det("person", 0.48)], now=5) == ("near_threshold", "person")
    assert chooser.choose(app, "cam3", [det("person", 0.51)], now=6) is None, "2 a minute at most"
    assert chooser.choose(app, "cam3", [det("person", 0.51)], now=70) == ("near_threshold", "person")

    by_class = manifest(near_threshold=0, classes=["helmet"])
    assert chooser.choose(by_class, "cam1", [det("helmet", 0.99)], now=0) == ("class", "helmet")
    rng = random.Random(7)
    sometimes = manifest(near_threshold=0, random_rate=0.5, per_minute=1000, per_hour=1000, per_day=1000,
                         dedup_s=0)
    picked = sum(1 for i in range(200) if Chooser({}, rng).choose(sometimes, f"c{i}", [det("x", 0.9)], now=i))
    assert 70 < picked < 130, picked


def test_the_site_overrides_an_apps_policy() -> None:
    app = manifest(near_threshold=0.05)
    assert Chooser({"ppe-watch": SamplePolicyOverride(near_threshold=0.0)}).choose(app, "cam1", [det("person", 0.5)]) is None


# ------------------------------------------------------------------ spool


def test_a_full_spool_drops_the_least_valuable_first_and_counts_drops(store: Store, tmp_path: Path) -> None:
    size = len(FRAME)
    s = spool(store, tmp_path, quota_bytes=size * 3 + 10, quota_count=100, min_free_bytes=0)
    kept = [keep(s, r) for r in ("random", "near_threshold", "false_positive")]
    assert all(kept)
    assert keep(s, "missed_detection"), "an operator's flag pushes out the random sample"
    assert keep(s, "near_threshold"), "pushes out the older near-threshold one"
    assert keep(s, "random") is None, "nothing queued is worth less: the new random sample is the one dropped"
    counts = store.samples.counts()
    assert counts["dropped"] == {"random": 2, "near_threshold": 1}
    queued = {r: c["queued"] for r, c in counts["by_reason"].items()}
    assert queued == {"false_positive": 1, "missed_detection": 1, "near_threshold": 1}
    assert sum(c["queued_bytes"] for c in counts["by_reason"].values()) <= size * 3 + 10
    assert len(list((tmp_path / "samples").glob("*.jpg"))) == 3, "dropped samples leave the disk too"


def test_the_count_quota_and_a_low_disk(store: Store, tmp_path: Path) -> None:
    s = spool(store, tmp_path, quota_count=2, min_free_bytes=0)
    for _ in range(4):
        keep(s, "near_threshold")
    assert store.samples.counts()["by_reason"]["near_threshold"]["queued"] == 2
    full_disk = spool(store, tmp_path, min_free_bytes=2**62)
    assert keep(full_disk, "false_positive") is None, "never fills the disk"
    assert store.samples.counts()["dropped"]["false_positive"] == 1


def test_a_sample_keeps_the_frame_the_predictions_and_the_context(store: Store, tmp_path: Path) -> None:
    s = spool(store, tmp_path, site="ward 7", max_side=320, min_free_bytes=0)
    sample_id = keep(s, "near_threshold")
    assert sample_id is not None
    [record] = store.samples.queued(10)
    meta = json.loads(record.meta_json)
    assert meta["site"] == "ward 7" and meta["model"] == "demo-detector@1.0.0" and meta["source"] == "cam1"
    assert meta["predictions"][0]["label"] == "person" and meta["reason"] == "near_threshold"
    with Image.open(io.BytesIO(s.image(sample_id) or b"")) as im:
        assert im.format == "JPEG" and max(im.size) == 320, "scaled to max_side"
    assert meta["image"]["width"] == 320


def test_orphan_files_from_a_crash_are_tidied(store: Store, tmp_path: Path) -> None:
    s = spool(store, tmp_path, min_free_bytes=0)
    keep(s, "random")
    (tmp_path / "samples" / "0123456789abcdef.jpg").write_bytes(FRAME)  # written, never indexed
    s.tidy()
    assert len(list((tmp_path / "samples").glob("*.jpg"))) == 1


# ------------------------------------------------------------------ redaction


def test_redaction_blurs_only_the_chosen_labels_regions() -> None:
    preds = [Prediction(label="person", score=0.9, box=(0.0, 0.0, 0.5, 0.5)),
             Prediction(label="helmet", score=0.9, box=(0.5, 0.5, 1.0, 1.0))]
    out = redact(FRAME, preds, ["person"])
    with Image.open(io.BytesIO(FRAME)) as a, Image.open(io.BytesIO(out)) as b:
        before, after = a.convert("L"), b.convert("L")
        w, h = before.size

        def diff(box: tuple[int, int, int, int]) -> float:
            x = list(before.crop(box).tobytes())
            y = list(after.crop(box).tobytes())
            return sum(abs(p - q) for p, q in zip(x, y, strict=True)) / len(x)

        assert diff((0, 0, w // 2, h // 2)) > 5 * max(1.0, diff((w // 2 + 8, h // 2 + 8, w, h))), \
            "the person's region changed much more than the rest (JPEG noise only)"
    assert redact(FRAME, preds, ["face"]) == FRAME, "nothing to blur: the bytes are untouched"


# ------------------------------------------------------------------ upload to the real inbox


def inbox(shop: Shop) -> list[dict[str, Any]]:
    r = httpx.get(f"{shop.url}/v1/samples", params={"limit": 1000},
                  headers={"Authorization": f"Bearer {shop.admin}"}, timeout=10)
    r.raise_for_status()
    found: list[dict[str, Any]] = r.json()["samples"]
    return found


def device(shop: Shop, name: str = "dev-1") -> str:
    return ok(shop.repo, "devices", "add", name).strip().splitlines()[-1]


def uploader(store: Store, s: Spool, shop: Shop, token: str, url: str | None = None, **settings: object) -> Uploader:
    cfg = SamplesSettings.model_validate({"upload_interval_s": 0.2, "retry_max_s": 1.0, **settings})
    return Uploader(s, store, cfg, FleetClient(Connection(ConnectionOptions(url or shop.url)), "dev-1", token))


@pytest.fixture
def shop(tmp_path: Path, models: dict[str, Path]) -> Iterator[Shop]:
    made = make_shop(tmp_path, models)
    yield made
    made.server.should_exit = True


@pytest.mark.slow
def test_samples_wait_while_the_appstore_is_down_and_all_arrive_once(store: Store, tmp_path: Path,
                                                                    shop: Shop) -> None:
    token = device(shop)
    port = free_port()  # where the AppStore will be once it is back: nothing answers there yet
    s = spool(store, tmp_path, min_free_bytes=0)
    up = uploader(store, s, shop, token, url=f"http://127.0.0.1:{port}", upload="full")
    up.start()
    try:
        ids = {keep(s, "near_threshold", source=f"cam{i}") for i in range(5)}
        up.wake()
        wait_until(lambda: up.state.state == "retrying", 20, what="the uploader retrying")
        ids |= {keep(s, "false_positive", source=f"cam{i}") for i in range(5)}  # more flow in meanwhile
        assert len(store.samples.queued(100)) == 10, "all queued, none lost"
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        server = uvicorn.Server(uvicorn.Config(build_app(shop.repo), log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        wait_until(lambda: not store.samples.queued(100), 60, what="every sample uploaded")
    finally:
        up.stop()
    received = inbox(shop)
    assert {x["meta"]["id"] for x in received} == ids and len(received) == 10, "all arrived, each once"
    assert all(x["has_image"] for x in received)
    assert not list((tmp_path / "samples").glob("*.jpg")), "uploaded frames leave the appliance's disk"
    server.should_exit = True


def test_upload_off_sends_nothing(store: Store, tmp_path: Path, shop: Shop) -> None:
    s = spool(store, tmp_path, min_free_bytes=0)
    keep(s, "false_positive")
    up = uploader(store, s, shop, device(shop), upload="off")
    up.start()
    assert up.run_once() == 0 and up.state.state == "off"
    up.stop()
    assert inbox(shop) == [] and len(store.samples.queued(10)) == 1, "kept on site, nothing left it"


def test_metadata_only_sends_no_pixels(store: Store, tmp_path: Path, shop: Shop) -> None:
    s = spool(store, tmp_path, min_free_bytes=0)
    sample_id = keep(s, "near_threshold")
    assert uploader(store, s, shop, device(shop), upload="metadata-only").run_once() == 1
    [got] = inbox(shop)
    assert got["meta"]["id"] == sample_id and got["has_image"] is False and got["meta"]["image"] is None
    assert got["meta"]["predictions"][0]["label"] == "person" and got["meta"]["privacy"] == "metadata-only"
    assert not list((shop.repo / "samples").rglob("*.jpg")), "no picture reached the AppStore"


def test_redaction_blurs_what_leaves_and_keeps_the_rest(store: Store, tmp_path: Path, shop: Shop) -> None:
    s = spool(store, tmp_path, min_free_bytes=0)
    sample_id = keep(s, "false_positive")
    original = s.image(sample_id or "")
    assert original is not None
    assert uploader(store, s, shop, device(shop), upload="full", redact_labels=["person"]).run_once() == 1
    [got] = inbox(shop)
    assert got["meta"]["redacted"] == ["person"]
    [sent] = (shop.repo / "samples").rglob(f"{sample_id}.jpg")
    with Image.open(io.BytesIO(original)) as a, Image.open(sent) as b:
        w, h = a.size
        box = (w // 4, h // 4, w // 2, (3 * h) // 4)  # the person's box of keep()'s prediction
        inside = _mean_diff(a.convert("L").crop(box), b.convert("L").crop(box))
        outside = _mean_diff(a.convert("L").crop((0, 0, w // 5, h // 5)), b.convert("L").crop((0, 0, w // 5, h // 5)))
    assert inside > 3 * max(outside, 1.0), (inside, outside)


def _mean_diff(x: Image.Image, y: Image.Image) -> float:
    a, b = x.tobytes(), y.tobytes()
    return sum(abs(p - q) for p, q in zip(a, b, strict=True)) / len(a)


@pytest.mark.slow
def test_a_killed_appliance_finishes_its_uploads_after_restart_with_no_loss_and_no_duplicate(
        make_daemon: DaemonFactory, shop: Shop) -> None:
    d = make_daemon(start=False)
    token = device(shop, d.device)
    with d.config.open("a") as f:
        # every frame a sample, sent slowly (about 2 s each at 160 kbit/s) so that the kill lands mid-batch
        f.write(f'[appstore]\nurl = "{shop.url}/"\nroot = "{shop.root}"\ndevice_token = "{token}"\n'
                '[samples]\nupload = "full"\nbandwidth_kbps = 160\nupload_interval_s = 0.5\nretry_max_s = 2\n'
                '[samples.apps.ppe-watch]\nrandom_rate = 1.0\nnear_threshold = 0\ndedup_s = 0\n'
                'per_minute = 100\n')
    d.start()
    wait_until(lambda: any(a["name"] == "ppe-watch" and a["state"] == "serving" for a in d.status()["apps"]), 60,
               what="ppe-watch from the AppStore")
    pub = Publisher(d.mqtt_port)
    try:
        for i in range(5):
            pub.publish("cameras/cam1/frame", render_frame(float(i), 0))
            wait_until(lambda i=i: _counts(d)[0] >= i + 1, 30, what=f"sample {i + 1}")  # type: ignore[misc]
    finally:
        pub.close()
    wait_until(lambda: _counts(d)[1] >= 1 and _counts(d)[0] - _counts(d)[1] >= 2, 60,
               what="a batch half sent")
    d.kill()  # SIGKILL, mid-batch
    d.start()
    wait_until(lambda: _counts(d) == (5, 5), 90, what="every sample uploaded after the restart")
    received = inbox(shop)
    assert len(received) == 5 and len({x["meta"]["id"] for x in received}) == 5, "none lost, none twice"


def _counts(d: Any) -> tuple[int, int]:
    """(samples kept, samples uploaded) as the appliance reports them."""
    by = (d.status().get("samples") or {}).get("by_reason", {})
    kept = sum(c["queued"] + c["uploaded"] for c in by.values())
    return kept, sum(c["uploaded"] for c in by.values())


@pytest.mark.slow
def test_an_operators_false_positive_becomes_a_sample_with_the_clean_frame(make_daemon: DaemonFactory,
                                                                          models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-detector"]))
    rule = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "debounce": {"n": 1, "m": 1},
            "cooldown_s": 0}
    app = {"schema": 1, "name": "ppe-watch", "version": "1.0.0", "model": {"name": "demo-detector", "version": "1.0.0"},
           "sources": ["cameras/+/frame"], "rules": [rule], "samples": {"near_threshold": 0}}
    (tmp_path / "ppe.json").write_text(json.dumps(app))
    d.cli("apps", "add", str(tmp_path / "ppe.json"))
    d.cli("users", "add", "shift", "--role", "operator", "--password-stdin", input="quiet corridor at night\n")
    d.start()
    wait_until(lambda: any(a["state"] == "serving" for a in d.status()["apps"]), 30, what="the app serving")
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", FRAME)
    finally:
        pub.close()
    page = httpx.Client(base_url=d.base_url, timeout=30)
    assert page.post("/login", data={"user": "shift", "password": "quiet corridor at night"}).status_code == 303
    event = wait_until(lambda: page.get("/api/v1/events").json(), 30, what="an alert")[0]
    assert (d.status().get("samples") or {}).get("by_reason", {}) == {}, "a sure detection is no sample"
    csrf = page.get("/api/v1/me").json()["csrf_token"]
    r = page.post(f"/alerts/{event['id']}/handle", data={"action": "false_positive", "csrf_token": csrf})
    assert r.status_code == 303
    by = d.status()["samples"]["by_reason"]
    assert by["false_positive"]["queued"] == 1, by
    [kept] = list((d.state_dir / "samples").glob("*.jpg"))
    assert kept.read_bytes() == FRAME, "the clean frame as it arrived, not the annotated snapshot"


# ------------------------------------------------------------------ what users really produce, through the inbox


def classifier_manifest() -> AppManifest:
    return AppManifest.model_validate({
        "schema": 1, "name": "defect-watch", "version": "1.0.0", "model": {"name": "demo-classifier", "version": "1.0.0"},
        "sources": ["cameras/+/frame"], "rules": [{"name": "r", "labels": ["scratch"], "min_score": 0.6}],
        "samples": {"near_threshold": 0.1, "dedup_s": 0}})


def test_every_kind_of_sample_users_produce_arrives_in_the_real_inbox(store: Store, tmp_path: Path,
                                                                      shop: Shop) -> None:
    """An operator's missed detection (no box), a false positive, a classification app's near-threshold sample
    (no box) and one with several detections: the inbox takes every one of them."""
    s = spool(store, tmp_path, min_free_bytes=0)
    capture = SampleCapture(s, store, tmp_path, {})
    missed = capture.flag_frame("cam1", FRAME, "person without helmet")
    snapshot = "snapshots/2026-12-01/e1.jpg"
    (tmp_path / frame_file(snapshot)).parent.mkdir(parents=True)
    (tmp_path / frame_file(snapshot)).write_bytes(FRAME)
    event = EventRecord(id="e1", ts=1.0, app="ppe-watch", source="cam2", rule="r", label="person", score=0.91,
                        box=(0.1, 0.2, 0.3, 0.6), snapshot=snapshot)
    false_positive = capture.flag_event(event, "false_positive")
    unsure = Detection(label="scratch", score=0.55)  # a classifier's top class: no location
    chosen = Chooser({}).choose(classifier_manifest(), "cam3", [unsure])
    assert chosen is not None and chosen[0] == "near_threshold"
    classified = s.capture(app="defect-watch", app_version="1.0.0", model="demo-classifier@1.0.0", source="cam3",
                           reason=chosen[0], frame=FRAME, predictions=[unsure.prediction()])
    crowd = s.capture(app="ppe-watch", app_version="1.0.0", model="demo-detector@1.0.0", source="cam4",
                      reason="near_threshold", frame=FRAME,
                      predictions=[det("person", 0.52).prediction(), det("helmet", 0.9).prediction(),
                                   Detection("vest", 0.48, (0.0, 0.0, 1.0, 1.0)).prediction()])
    ids = {missed, false_positive, classified, crowd}
    assert None not in ids and len(ids) == 4

    up = uploader(store, s, shop, device(shop), upload="full")
    assert up.run_once() == 4, up.state
    received = {x["meta"]["id"]: x["meta"] for x in inbox(shop)}
    assert set(received) == ids, "all four arrived"
    assert received[missed]["reason"] == "missed_detection" and received[missed]["predictions"] == [
        {"label": "person without helmet", "score": 0.0, "box": None}]
    assert received[false_positive]["predictions"][0]["box"] == [0.1, 0.2, 0.3, 0.6]
    assert received[classified]["predictions"] == [{"label": "scratch", "score": 0.55, "box": None}]
    assert [p["label"] for p in received[crowd]["predictions"]] == ["person", "helmet", "vest"]
    assert up.state.refused == 0 and not store.samples.queued(10)


def test_a_record_the_inbox_refuses_is_set_aside_and_the_queue_moves_on(store: Store, tmp_path: Path,
                                                                       shop: Shop) -> None:
    """A malformed record at the head of the queue (an operator's report, the highest priority) does not
    stop the ones behind it: it is marked refused with the AppStore's reason, counted and not sent again."""
    s = spool(store, tmp_path, min_free_bytes=0)
    behind = {keep(s, "near_threshold", source=f"cam{i}") for i in range(3)}
    # the head of the queue: a record the AppStore refuses (it names another device than the one sending it)
    bad = SampleCapture(Spool(store, s._settings, tmp_path / "samples", "someone-else"), store, tmp_path, {}) \
        .flag_frame("cam9", FRAME, "person")
    assert bad is not None and store.samples.queued(1)[0].id == bad, "the bad one is first in line"

    up = uploader(store, s, shop, device(shop), upload="full")
    up.start()
    try:
        wait_until(lambda: not store.samples.queued(10), 30, what="the queue emptied")
    finally:
        up.stop()
    assert {x["meta"]["id"] for x in inbox(shop)} == behind, "every good sample arrived; the bad one did not"
    assert up.state.refused == 1 and "someone-else" in up.state.last_refusal
    [refused] = [r for r in store.samples.recent(10) if r.id == bad]
    assert refused.state == "refused" and "a device sends only its own samples" in refused.refused_reason
    assert store.samples.counts()["by_reason"]["missed_detection"]["refused"] == 1
    assert not s.path(bad).exists(), "its frame left the disk"
    assert up.run_once() == 0 and len(inbox(shop)) == 3, "never sent again"


def test_a_transient_refusal_is_retried_not_set_aside(store: Store, tmp_path: Path, shop: Shop) -> None:
    """A wrong device token (401) is the AppStore's word on the link, not on the record: it waits and retries."""
    s = spool(store, tmp_path, min_free_bytes=0)
    keep(s, "near_threshold")
    up = uploader(store, s, shop, "not-a-token", upload="full")
    with pytest.raises(Refused) as caught:
        up.run_once()
    assert caught.value.status == 401 and not caught.value.permanent
    assert len(store.samples.queued(10)) == 1 and up.state.refused == 0, "still queued, not set aside"


def test_a_lowered_quota_is_applied_at_start(store: Store, tmp_path: Path) -> None:
    big = spool(store, tmp_path, min_free_bytes=0)
    kept = [keep(big, "random", source=f"cam{i}") for i in range(4)] + [keep(big, "false_positive")]
    assert None not in kept and len(store.samples.queued(10)) == 5
    small = spool(store, tmp_path, min_free_bytes=0, quota_count=2)
    small.tidy()  # what the daemon does at start
    left = {r.id for r in store.samples.queued(10)}
    assert len(left) == 2 and kept[-1] in left, "the operator's flag stays; the random ones go first"
    assert sorted(p.stem for p in (tmp_path / "samples").glob("*.jpg")) == sorted(left), "their frames left too"
    assert store.samples.counts()["dropped"] == {"random": 3}
