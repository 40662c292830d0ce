"""The reference AppStore end to end: real tuf on both sides, real HTTP on loopback, real SQLite.

One repository is created, a real model and app are published into it, and ``appstore serve`` runs as a
subprocess for the module; each test uses its own channels and devices. What the appliance would see is
checked with a real ``tuf.ngclient.Updater`` against the server, never by reading files behind its back.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from tuf.api.exceptions import ExpiredMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater

from appliance.demo.modelgen import build_detector
from appstore.cli import main
from appstore.guard import evaluate
from appstore.repository import Repository
from appstore.server import build_app
from formats.channel import ChannelDoc, DeviceReport, in_rollout
from tests.conftest import ROOT, answers, free_port, wait_until

APP_PATH = "apps/ppe-watch/1.0.0/app.json"


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(repo: Path, *args: str) -> Result:
    """``appstore --repo REPO ARGS`` in this process (the same ``main`` the console script calls)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--repo", str(repo), *args])
    return Result(code, out.getvalue(), err.getvalue())


def ok(repo: Path, *args: str) -> str:
    r = cli(repo, *args)
    assert r.code == 0, f"appstore {' '.join(args)} failed ({r.code}): {r.err}"
    return r.out


def refused(repo: Path, *args: str) -> str:
    """Run a command that must fail the CLI way: exit 2 and one line ``error: ...`` naming what to do."""
    r = cli(repo, *args)
    assert r.code == 2, f"appstore {' '.join(args)} should have been refused: {r.out}{r.err}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    return lines[0]


def write_app(path: Path, version: str = "1.0.0", model: str = "demo-detector", description: str = "helmets") -> Path:
    path.write_text(json.dumps({"schema": 1, "name": "ppe-watch", "version": version, "description": description,
                                "model": {"name": model, "version": "1.0.0"}, "sources": ["cameras/+/frame"],
                                "rules": [{"name": "no-helmet", "labels": ["person"], "min_score": 0.5}]}))
    return path


@dataclass
class Store:
    repo: Path
    url: str
    root: bytes  # 1.root.json: what an appliance gets at provisioning
    model_dir: Path
    app_json: Path
    admin_token: str

    def updater(self, client: Path) -> Updater:
        """A fresh Updater over ``client`` (its cached metadata survives, as on an appliance)."""
        (client / "metadata").mkdir(parents=True, exist_ok=True)
        return Updater(str(client / "metadata"), f"{self.url}/metadata/", str(client / "targets"),
                       f"{self.url}/targets/", bootstrap=self.root)

    def fetch(self, client: Path, path: str) -> tuple[TargetFile, bytes]:
        u = self.updater(client)
        u.refresh()
        info = u.get_targetinfo(path)
        assert info is not None, f"{path} is not a target"
        return info, Path(u.download_target(info)).read_bytes()

    def channel(self, client: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        info, raw = self.fetch(client, f"channels/{name}.json")
        doc: dict[str, Any] = json.loads(raw)
        return doc, info.custom

    def post_status(self, device: str, token: str | None, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(f"{self.url}/v1/devices/{device}/status", json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    base = tmp_path_factory.mktemp("appstore")
    repo = base / "repo"
    ok(repo, "keys", "init")
    model_dir = build_detector(base / "demo-detector")
    ok(repo, "publish", "model", str(model_dir))
    app_json = write_app(base / "app.json")
    ok(repo, "publish", "app", str(app_json))
    admin = ok(repo, "admin-token").strip().splitlines()[-1]
    port = free_port()
    log = open(base / "serve.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([sys.executable, "-m", "appstore.cli", "--repo", str(repo), "serve", "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    try:
        wait_until(answers(f"{url}/metadata/timestamp.json", proc, base / "serve.log", "appstore serve"), 30,
                   what="appstore serve")
        yield Store(repo, url, (repo / "metadata" / "1.root.json").read_bytes(), model_dir, app_json, admin)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_keys_init_writes_a_2_of_3_root_and_refuses_to_overwrite(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    out = ok(repo, "keys", "init")
    assert "offline" in out and "root-1.json" in out
    root_md = Metadata[Root].from_file(str(repo / "metadata" / "1.root.json"))
    root = root_md.signed
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert all(len(root.roles[r].keyids) == 1 for r in ("targets", "snapshot", "timestamp"))
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)  # signed by a threshold of its own keys
    for name in ("1.targets.json", "1.snapshot.json", "timestamp.json"):
        assert (repo / "metadata" / name).is_file()
    keys = sorted(p.name for p in (repo / "keys").iterdir())
    assert keys == ["root-1.json", "root-2.json", "root-3.json", "snapshot.json", "targets.json", "timestamp.json"]
    assert all(stat.S_IMODE((repo / "keys" / k).stat().st_mode) == 0o600 for k in keys)

    assert "refusing to overwrite" in refused(repo, "keys", "init")
    assert "--root-threshold" in refused(tmp_path / "other", "keys", "init", "--root-threshold", "4")


def test_published_model_and_app_verify_through_the_updater(store: Store, tmp_path: Path) -> None:
    info, raw = store.fetch(tmp_path / "client", APP_PATH)
    assert raw == store.app_json.read_bytes()
    assert info.custom == {"kind": "app", "name": "ppe-watch", "version": "1.0.0", "description": "helmets",
                           "model": "demo-detector@1.0.0"}

    onnx = (store.model_dir / "model.onnx").read_bytes()
    info, raw = store.fetch(tmp_path / "client", "models/demo-detector/1.0.0/model.json")
    card = json.loads(raw)
    assert info.custom == {"kind": "model", "name": "demo-detector", "version": "1.0.0",
                           "description": card["description"], "labels": ["person", "helmet"], "size": len(onnx)}
    info, raw = store.fetch(tmp_path / "client", "models/demo-detector/1.0.0/model.onnx")
    assert raw == onnx and info.custom == {"kind": "model-file"}

    # consistent snapshots: the file is served under its sha256-prefixed name only
    sha = info.hashes["sha256"]
    assert httpx.get(f"{store.url}/targets/models/demo-detector/1.0.0/{sha}.model.onnx").content == onnx
    assert httpx.get(f"{store.url}/targets/models/demo-detector/1.0.0/model.onnx").status_code == 404


def test_published_versions_are_immutable(store: Store, tmp_path: Path) -> None:
    targets_before = Repository(store.repo).targets().signed.version
    assert "nothing changed" in ok(store.repo, "publish", "app", str(store.app_json))
    assert "nothing changed" in ok(store.repo, "publish", "model", str(store.model_dir))

    changed = write_app(tmp_path / "app.json", description="helmets and vests")
    assert "immutable" in refused(store.repo, "publish", "app", str(changed))
    card = json.loads((store.model_dir / "model.json").read_text())
    other = tmp_path / "model"
    other.mkdir()
    (other / "model.onnx").write_bytes((store.model_dir / "model.onnx").read_bytes())
    (other / "model.json").write_text(json.dumps({**card, "description": "changed"}))
    assert "immutable" in refused(store.repo, "publish", "model", str(other))

    assert Repository(store.repo).targets().signed.version == targets_before
    _, raw = store.fetch(tmp_path / "client", APP_PATH)
    assert raw == store.app_json.read_bytes()


def test_an_app_whose_model_is_not_published_is_refused(store: Store, tmp_path: Path) -> None:
    app = write_app(tmp_path / "app.json", version="9.0.0", model="no-such-model")
    line = refused(store.repo, "publish", "app", str(app))
    assert "no-such-model 1.0.0" in line and "appstore publish model" in line
    u = store.updater(tmp_path / "client")
    u.refresh()
    assert u.get_targetinfo("apps/ppe-watch/9.0.0/app.json") is None


def test_bad_input_is_one_line_and_exit_2(store: Store, tmp_path: Path) -> None:
    assert "no such model package" in refused(store.repo, "publish", "model", str(tmp_path / "nope"))
    (tmp_path / "broken.json").write_text("{not json")
    assert "not valid JSON" in refused(store.repo, "publish", "app", str(tmp_path / "broken.json"))
    assert "appstore channel set nowhere" in refused(store.repo, "channel", "show", "nowhere")
    assert "NAME=VERSION" in refused(store.repo, "channel", "set", "stable", "--app", "ppe-watch")
    assert "not published" in refused(store.repo, "channel", "set", "stable", "--app", "ppe-watch=7.7.7")
    assert "keys init" in refused(tmp_path / "no-repo", "devices")
    # the console script's process exits 2 the same way
    r = subprocess.run([sys.executable, "-m", "appstore.cli", "--repo", str(store.repo), "channel", "show", "nowhere"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: no channel 'nowhere'")


def test_channel_set_rollout_promote_and_halt_through_the_updater(store: Store, tmp_path: Path) -> None:
    ok(store.repo, "publish", "app", str(write_app(tmp_path / "app-1.1.0.json", version="1.1.0")))
    client = tmp_path / "client"

    ok(store.repo, "channel", "set", "beta", "--app", "ppe-watch=1.0.0")
    doc, custom = store.channel(client, "beta")
    assert doc == {"schema": 1, "channel": "beta", "version": 1, "apps": {"ppe-watch": "1.0.0"}}
    assert custom == {"kind": "channel", "channel": "beta", "version": 1}

    ok(store.repo, "channel", "set", "beta", "--app", "ppe-watch=1.1.0", "--percent", "10", "--group", "canary")
    doc, custom = store.channel(client, "beta")
    assert doc == {"schema": 1, "channel": "beta", "version": 2, "apps": {"ppe-watch": "1.0.0"}, "rollout": {
        "id": "r2", "apps": {"ppe-watch": "1.1.0"}, "percent": 10, "groups": ["canary"], "halted": False,
        "reason": "", "max_unhealthy_share": 0.2, "window_s": 600}}
    assert custom["version"] == 2
    assert "under way" in refused(store.repo, "channel", "set", "beta", "--app", "ppe-watch=1.0.0")

    ok(store.repo, "channel", "promote", "beta")
    doc, _ = store.channel(client, "beta")
    assert doc == {"schema": 1, "channel": "beta", "version": 3, "apps": {"ppe-watch": "1.1.0"}}

    ok(store.repo, "channel", "set", "beta", "--app", "ppe-watch=1.0.0", "--percent", "50")
    ok(store.repo, "channel", "halt", "beta", "--reason", "operators saw false alarms")
    doc, custom = store.channel(client, "beta")
    assert doc["version"] == 5 and custom["version"] == 5 and doc["apps"] == {"ppe-watch": "1.1.0"}
    assert doc["rollout"]["id"] == "r4" and doc["rollout"]["halted"] is True
    assert doc["rollout"]["reason"] == "operators saw false alarms"
    assert "is halted" in refused(store.repo, "channel", "promote", "beta")
    assert json.loads(ok(store.repo, "channel", "show", "beta")) == doc


def report(device: str, channel: str, group: str, version: str = "1.0.0", state: str = "serving",
           healthy: bool = True, rollout: str | None = None) -> dict[str, Any]:
    return {"device": device, "channel": channel, "group": group, "rollout": rollout,
            "apps": {"ppe-watch": {"version": version, "state": state}},
            "health": {"ok": healthy, "reason": "" if healthy else "camera-3 silent"},
            "last_sync": 1732000000.0, "last_error": "", "version": "0.1.0"}


def test_device_reports_take_only_the_devices_own_token(store: Store) -> None:
    token_a = ok(store.repo, "devices", "add", "ward-1", "--group", "ward", "--channel", "stable").strip().splitlines()[-1]
    token_b = ok(store.repo, "devices", "add", "ward-2").strip().splitlines()[-1]
    assert "already registered" in refused(store.repo, "devices", "add", "ward-1")
    body = report("ward-1", "stable", "ward")

    r = store.post_status("ward-1", None, body)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert store.post_status("ward-1", "not-a-token", body).status_code == 401
    r = store.post_status("ward-1", token_b, body)
    assert r.status_code == 403 and "another device" in r.json()["error"]
    r = store.post_status("ward-1", token_a, body)
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = store.post_status("ward-1", token_a, {"device": "ward-1"})
    assert r.status_code == 400 and "health" in r.json()["error"]

    assert httpx.get(f"{store.url}/v1/devices").status_code == 401
    assert httpx.get(f"{store.url}/v1/devices", headers={"Authorization": f"Bearer {token_a}"}).status_code == 403
    r = httpx.get(f"{store.url}/v1/devices", headers={"Authorization": f"Bearer {store.admin_token}"})
    assert r.status_code == 200
    ward1 = next(d for d in r.json()["devices"] if d["id"] == "ward-1")
    assert ward1["channel"] == "stable" and ward1["group"] == "ward" and ward1["versions"] == {"ppe-watch": "1.0.0"}
    assert ward1["health"] == {"ok": True, "reason": ""} and ward1["last_seen"] is not None
    table = ok(store.repo, "devices")
    assert "ward-1" in table and "ppe-watch 1.0.0" in table and "ward-2" in table


def test_a_rollout_halts_itself_when_its_devices_report_unhealthy(store: Store, tmp_path: Path) -> None:
    ok(store.repo, "publish", "app", str(write_app(tmp_path / "app-1.2.0.json", version="1.2.0")))
    ok(store.repo, "channel", "set", "delta", "--app", "ppe-watch=1.0.0")
    ok(store.repo, "channel", "set", "delta", "--app", "ppe-watch=1.2.0", "--group", "canary",
       "--max-unhealthy-share", "0.5")
    tokens = {d: ok(store.repo, "devices", "add", d, "--group", "canary", "--channel", "delta").strip().splitlines()[-1]
              for d in ("canary-1", "canary-2", "canary-3")}
    client = tmp_path / "client"

    def post(device: str, **kw: Any) -> None:
        r = store.post_status(device, tokens[device], report(device, "delta", "canary", "1.2.0", rollout="r2", **kw))
        assert r.status_code == 200, r.text

    post("canary-1")
    post("canary-2", healthy=False)  # 1 of 2: not more than half
    doc, _ = store.channel(client, "delta")
    assert doc["rollout"]["halted"] is False

    post("canary-3", state="degraded")  # 2 of 3: the server halts the rollout and re-signs the channel
    doc, custom = store.channel(client, "delta")
    assert doc["version"] == 3 and custom["version"] == 3 and doc["apps"] == {"ppe-watch": "1.0.0"}
    assert doc["rollout"]["halted"] is True
    reason = doc["rollout"]["reason"]
    assert "2 of 3" in reason and "canary-2: health: camera-3 silent" in reason and "ppe-watch 1.2.0 degraded" in reason

    view = httpx.get(f"{store.url}/v1/devices", headers={"Authorization": f"Bearer {store.admin_token}"}).json()
    rollout = next(r for r in view["rollouts"] if r["channel"] == "delta")
    assert rollout["state"] == "halted" and rollout["reason"] == reason and len(rollout["unhealthy"]) == 2
    assert "halted" in ok(store.repo, "devices")


def test_the_guard_counts_only_the_rollouts_devices_inside_its_window() -> None:
    doc = ChannelDoc.model_validate({"channel": "x", "version": 2, "apps": {"ppe-watch": "1.0.0"}, "rollout": {
        "id": "r2", "apps": {"ppe-watch": "1.1.0"}, "groups": ["canary"], "window_s": 600}})
    sick = DeviceReport.model_validate(report("a", "x", "canary", "1.1.0", healthy=False))
    sick_on_old = DeviceReport.model_validate(report("b", "x", "ward", "1.0.0", healthy=False))
    verdict = evaluate(doc, 1000.0, [(1001.0, sick), (1001.0, sick_on_old)], now=1100.0)
    assert verdict.trips and verdict.devices == ("a",)
    assert not evaluate(doc, 1000.0, [(1001.0, sick)], now=1601.0).trips  # the window is over
    assert not evaluate(doc, 1000.0, [(999.0, sick)], now=1100.0).trips  # reported before the start

    assert doc.rollout is not None
    assert in_rollout(doc.rollout, "any", "canary") and not in_rollout(doc.rollout, "any", "ward")
    everyone = doc.rollout.model_copy(update={"percent": 100, "groups": []})
    assert all(in_rollout(everyone, f"d{i}", "") for i in range(50))
    assert doc.apps_for("any", "canary") == {"ppe-watch": "1.1.0"}
    halted = doc.model_copy(update={"rollout": doc.rollout.model_copy(update={"halted": True})})
    assert halted.apps_for("any", "canary") == {"ppe-watch": "1.0.0"}


def test_targets_answer_range_requests(store: Store, tmp_path: Path) -> None:
    info, onnx = store.fetch(tmp_path / "client", "models/demo-detector/1.0.0/model.onnx")
    url = f"{store.url}/targets/{info.get_prefixed_paths()[0]}"
    r = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == onnx[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(onnx)}"
    r = httpx.get(url, headers={"Range": f"bytes={len(onnx) - 10}-"})  # how a resumed download asks
    assert r.status_code == 206 and r.content == onnx[-10:]


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (httpx would normalise the dot segments away)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_static_files_have_no_listing_and_no_way_out(store: Store) -> None:
    for path in ("/targets/", "/targets/models/", "/metadata/", "/targets/../keys/targets.json",
                 "/targets/%2e%2e/keys/targets.json", "/metadata/..%2fkeys%2ftimestamp.json",
                 "/metadata/../fleet.db", "/keys/targets.json"):
        status, body = raw_get(store.url, path)
        assert status == 404, (path, status)
        assert b"private" not in body and "error" in json.loads(body), path


def test_an_expired_timestamp_is_refreshed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ok(repo, "keys", "init")
    Repository(repo).refresh(timedelta(hours=-1))  # as if cron had stopped refreshing it an hour ago
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(repo), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10, what="the in-thread AppStore server")
        store = Store(repo, f"http://127.0.0.1:{port}", (repo / "metadata" / "1.root.json").read_bytes(),
                      tmp_path, tmp_path, "")
        with pytest.raises(ExpiredMetadataError):
            store.updater(tmp_path / "client").refresh()

        out = ok(repo, "timestamp", "refresh")
        assert "timestamp version 3" in out
        store.updater(tmp_path / "client").refresh()  # the same appliance cache now accepts the fresh one
    finally:
        server.should_exit = True
        thread.join(10)


def test_publish_refuses_a_model_an_appliance_would_refuse(tmp_path: Path) -> None:
    """The same card-against-graph check as `appliance models add` (formats.graph)."""
    repo = tmp_path / "repo"
    ok(repo, "keys", "init")
    model = build_detector(tmp_path / "demo-detector")
    card = json.loads((model / "model.json").read_text())
    card["labels"] = [*card["labels"], "vest"]  # the graph has rows for 2 classes, the card names 3
    (model / "model.json").write_text(json.dumps(card))
    line = refused(repo, "publish", "model", str(model))
    assert "3 labels need 7 rows" in line and "graph has 6" in line, line
