"""The appliance's side of the AppStore: verified sync, refusals, resumed downloads, staged rollouts, offline.

Real python-tuf on both sides and real HTTP on loopback: the reference AppStore (``appstore``) serves a
repository made by its own CLI; the appliance runs as a subprocess. Attacks are made the way an attacker
would, by changing what the server serves (bytes of a target, old or foreign metadata), never by
reaching into the appliance.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Protocol

import httpx
import pytest
import uvicorn

from appliance.demo.scene import render_frame
from appliance.sync import desired_apps
from appstore.repository import Repository
from appstore.server import build_app
from appstore_client.client import AppStore, Catalog, CatalogEntry
from appstore_client.errors import AppStoreError
from appstore_client.fetcher import ResumableFetcher
from formats.channel import ChannelDoc, Rollout
from tests.conftest import Daemon, DaemonFactory, Publisher, Subscriber, wait_until
from tests.test_appstore import ok, write_app

pytestmark = pytest.mark.slow


@dataclass
class Shop:
    """A reference AppStore with ppe-watch 1.0.0 (and its model) on channel stable, served on loopback."""

    repo: Path
    url: str
    root: Path  # 1.root.json, as provisioning would hand it to the appliance
    folder: Path
    admin: str
    server: uvicorn.Server

    def publish_app(self, version: str, model: str = "demo-detector") -> None:
        ok(self.repo, "publish", "app", str(write_app(self.folder / f"app-{version}.json", version, model)))

    def client(self, cache: Path, **fetcher: Any) -> AppStore:
        return AppStore(self.url, self.root.read_bytes(), cache, ResumableFetcher(cache / "partial", **fetcher))

    def target_file(self, path: str) -> Path:
        """Where the server keeps a target's bytes (consistent snapshots: hash-prefixed)."""
        folder, _, name = path.rpartition("/")
        [found] = (self.repo / "targets" / folder).glob(f"*.{name}")
        return found

    def fleet(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/devices", headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result


def serve(app: Any) -> tuple[uvicorn.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    wait_until(lambda: server.started, 10, what="the AppStore server")
    return server, int(sock.getsockname()[1])


@pytest.fixture
def shop(tmp_path: Path, models: dict[str, Path]) -> Iterator[Shop]:
    made = make_shop(tmp_path, models)
    yield made
    made.server.should_exit = True


def make_shop(tmp_path: Path, models: dict[str, Path]) -> Shop:
    """A served AppStore with ppe-watch 1.0.0 on channel stable (stop it with ``.server.should_exit``)."""
    repo = tmp_path / "appstore"
    ok(repo, "keys", "init")
    ok(repo, "publish", "model", str(models["demo-detector"]))
    ok(repo, "publish", "app", str(write_app(tmp_path / "app-1.0.0.json")))
    ok(repo, "channel", "set", "stable", "--app", "ppe-watch=1.0.0")
    admin = ok(repo, "admin-token").strip().splitlines()[-1]
    server, port = serve(build_app(repo))
    root = tmp_path / "root.json"
    shutil.copy(repo / "metadata" / "1.root.json", root)
    return Shop(repo, f"http://127.0.0.1:{port}", root, tmp_path, admin, server)


def appliance(make_daemon: DaemonFactory, shop: Shop, extra: str = "") -> Daemon:
    """A daemon registered with the AppStore (its own device token) and following channel stable."""
    d = make_daemon(start=False)
    token = ok(shop.repo, "devices", "add", d.device).strip().splitlines()[-1]
    with d.config.open("a") as f:
        f.write(f'[appstore]\nurl = "{shop.url}/"\nroot = "{shop.root}"\nchannel = "stable"\n'
                f'device_token = "{token}"\nrefresh_s = 600\n{extra}')
    d.start()
    return d


class Nudgeable(Protocol):
    """An appliance the tests can reach on its broker: a daemon, or a box under the launcher."""

    mqtt_port: int
    device: str


def sync_now(d: Nudgeable) -> None:
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish(f"appliance/{d.device}/commands", b'{"cmd": "sync"}')
    finally:
        pub.close()


class Results:
    """The appliance's results topic, counted."""

    def __init__(self, d: Daemon) -> None:
        self._sub = Subscriber(d.mqtt_port, f"appliance/{d.device}/results")
        self.messages: list[dict[str, Any]] = []

    def count(self) -> int:
        while not self._sub.messages.empty():
            self.messages.append(json.loads(self._sub.messages.get()[1]))
        return len(self.messages)

    def close(self) -> None:
        self._sub.close()


def app_state(d: Any, name: str) -> dict[str, Any] | None:
    return next((a for a in d.status()["apps"] if a["name"] == name), None)


def serving(d: Any, name: str, version: str) -> bool:
    a = app_state(d, name)
    return bool(a and a["state"] == "serving" and a["version"] == version)


# ------------------------------------------------------------------ end to end with the daemon


def test_the_appliance_installs_what_its_channel_says_and_reports(make_daemon: DaemonFactory, shop: Shop) -> None:
    d = appliance(make_daemon, shop)
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0 from the AppStore")
    link = wait_until(lambda: (s := d.status()["appstore"])["state"] == "in sync" and s, 30, what="in sync")
    assert link["channel"] == "stable" and link["desired"] == {"ppe-watch": "1.0.0"} and not link["refused"]
    fleet = wait_until(lambda: (f := shop.fleet()) and f["devices"] and f["devices"][0].get("apps") and f, 30,
                       what="the appliance's report in the fleet view")
    device = fleet["devices"][0]
    assert device["id"] == d.device and device["apps"]["ppe-watch"]["version"] == "1.0.0"
    assert device["health"]["ok"] is True
    with sqlite3.connect(f"file:{d.state_dir / 'appliance.db'}?mode=ro", uri=True) as db:
        lines = set(db.execute("SELECT actor, action, address FROM audit_log"))
    assert {("appstore-sync", "model.install", "appstore"), ("appstore-sync", "app.install", "appstore")} <= lines, \
        "the audit log says the AppStore sync installed them"


def test_a_new_version_swaps_within_one_sync_with_no_lost_frame(make_daemon: DaemonFactory, shop: Shop) -> None:
    d = appliance(make_daemon, shop, "[outputs]\nresults = true\n")
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0")
    results = Results(d)
    pub = Publisher(d.mqtt_port)
    frame = render_frame(0.0, 0)
    sent = 0

    def one_frame() -> None:
        """Send a frame and wait for its result: one in flight at a time, so none is skipped by design."""
        nonlocal sent
        pub.publish("cameras/cam1/frame", frame)
        sent += 1
        wait_until(lambda: results.count() >= sent, 30, what=f"the result of frame {sent}")

    try:
        one_frame()
        shop.publish_app("1.1.0")
        ok(shop.repo, "channel", "set", "stable", "--app", "ppe-watch=1.1.0")
        pub.publish(f"appliance/{d.device}/commands", b'{"cmd": "sync"}')
        while not serving(d, "ppe-watch", "1.1.0"):
            assert sent < 2000, "1.1.0 never served"
            one_frame()
        for _ in range(3):
            one_frame()
    finally:
        pub.close()
        results.close()
    assert results.count() == sent, "no frame lost during the swap"
    assert {m["app"] for m in results.messages} == {"ppe-watch"}
    src = next(s for s in d.status()["sources"] if s["id"] == "cam1")
    assert src["received"] == src["processed"] == sent and not src["rejected"]


def test_a_tampered_update_is_refused_and_the_current_version_keeps_serving(make_daemon: DaemonFactory,
                                                                           shop: Shop) -> None:
    d = appliance(make_daemon, shop)
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0")
    shop.publish_app("1.2.0")
    ok(shop.repo, "channel", "set", "stable", "--app", "ppe-watch=1.2.0")
    target = shop.target_file("apps/ppe-watch/1.2.0/app.json")
    target.write_bytes(target.read_bytes().replace(b'"min_score": 0.5', b'"min_score": 0.1'))
    sync_now(d)
    link = wait_until(lambda: (s := d.status()["appstore"])["refused"] and s, 30, what="the refusal")
    assert link["state"] == "refused" and "do not match their signed length or hashes" in link["refused"]["ppe-watch"]
    assert serving(d, "ppe-watch", "1.0.0"), "the installed version keeps serving"
    assert "refused" in d.log()


def test_unreachable_appstore_backs_off_and_the_appliance_keeps_serving(make_daemon: DaemonFactory,
                                                                       shop: Shop) -> None:
    d = appliance(make_daemon, shop)
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0")
    shop.server.should_exit = True
    wait_until(lambda: not _port_open(shop.url), 10, what="the AppStore down")
    sync_now(d)
    link = wait_until(lambda: (s := d.status()["appstore"])["state"] == "offline" and s, 30, what="offline")
    assert "cannot be reached" in link["last_error"] and link["next_try_s"] <= 3.0
    sync_now(d)
    wait_until(lambda: d.status()["appstore"]["next_try_s"] > link["next_try_s"] * 1.01
               or d.status()["appstore"]["last_attempt"] > link["last_attempt"], 30, what="a second try")
    assert serving(d, "ppe-watch", "1.0.0") and d.healthz()[0] == 200


def _port_open(url: str) -> bool:
    host, port = url.rsplit(":", 1)
    try:
        with socket.create_connection((host.split("//")[1], int(port)), timeout=1):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ what TUF refuses, through the client


def refused(shop: Shop, cache: Path, reason: str) -> AppStoreError:
    with pytest.raises(AppStoreError) as caught:
        client = shop.client(cache)
        client.refresh()
        client.channel("stable")
        client.download("apps/ppe-watch/1.0.0/app.json", cache / "app.json")
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_a_target_whose_bytes_changed_is_refused(shop: Shop, tmp_path: Path) -> None:
    target = shop.target_file("apps/ppe-watch/1.0.0/app.json")
    target.write_bytes(target.read_bytes().replace(b"helmets", b"hacked!"))  # same length, other bytes
    assert "signed length or hashes" in str(refused(shop, tmp_path / "c", "tampered"))
    assert not (tmp_path / "c" / "app.json").exists(), "nothing refused is left behind"


def test_a_target_larger_than_its_metadata_says_is_refused(shop: Shop, tmp_path: Path) -> None:
    target = shop.target_file("apps/ppe-watch/1.0.0/app.json")
    target.write_bytes(target.read_bytes() + b" " * 1000)
    refused(shop, tmp_path / "c", "tampered")


def test_a_replayed_older_timestamp_is_refused(shop: Shop, tmp_path: Path) -> None:
    old = (shop.repo / "metadata" / "timestamp.json").read_bytes()
    shop.publish_app("1.1.0")  # a newer timestamp, which the appliance then trusts
    shop.client(tmp_path / "c").refresh()
    (shop.repo / "metadata" / "timestamp.json").write_bytes(old)  # the freeze: yesterday's state again
    assert "older metadata than already trusted" in str(refused(shop, tmp_path / "c", "rollback"))


def test_expired_metadata_is_refused(shop: Shop, tmp_path: Path) -> None:
    Repository(shop.repo).refresh(timedelta(hours=-1))
    assert "expired" in str(refused(shop, tmp_path / "c", "expired"))


def test_metadata_signed_by_an_untrusted_key_is_refused(shop: Shop, tmp_path: Path) -> None:
    other = tmp_path / "impostor"
    ok(other, "keys", "init")
    shutil.copy(other / "metadata" / "timestamp.json", shop.repo / "metadata" / "timestamp.json")
    assert "not signed by the keys this appliance trusts" in str(refused(shop, tmp_path / "c", "untrusted"))


def test_a_mix_of_metadata_versions_is_refused(shop: Shop, tmp_path: Path) -> None:
    meta = shop.repo / "metadata"
    before = {p.name for p in meta.glob("*.targets.json")}
    shop.publish_app("1.1.0")
    [new] = {p.name for p in meta.glob("*.targets.json")} - before
    old = max(before, key=lambda n: int(n.split(".")[0]))
    shutil.copy(meta / old, meta / new)  # the new snapshot with the old targets
    refused(shop, tmp_path / "c", "tampered")  # the snapshot signs the targets file's length and hash


# ------------------------------------------------------------------ resumed downloads


class Cutting(SimpleHTTPRequestHandler):
    """Serves a folder, with Range; the first request for a model file is cut off halfway."""

    cut: ClassVar[set[str]] = set()
    ranges: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            Cutting.ranges.append(self.headers["Range"])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if path.name.endswith("model.onnx") and self.path not in Cutting.cut:
            Cutting.cut.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def cutting(shop: Shop) -> Iterator[str]:
    Cutting.cut, Cutting.ranges = set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Cutting(*a, directory=str(shop.repo)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_interrupted_download_resumes_where_it_stopped(shop: Shop, cutting: str, tmp_path: Path) -> None:
    size = shop.target_file("models/demo-detector/1.0.0/model.onnx").stat().st_size
    client = AppStore(cutting, shop.root.read_bytes(), tmp_path, ResumableFetcher(tmp_path / "partial",
                                                                                  backoff_s=0.01))
    client.refresh()
    path = client.download("models/demo-detector/1.0.0/model.onnx", tmp_path / "model.onnx")
    assert path.read_bytes() == shop.target_file("models/demo-detector/1.0.0/model.onnx").read_bytes()
    assert Cutting.ranges == [f"bytes={size // 2}-"], "asked only for the missing half"
    assert not list((tmp_path / "partial").iterdir()), "no partial file left"


def test_a_partial_download_survives_a_restart(shop: Shop, cutting: str, tmp_path: Path) -> None:
    def client(retries: int) -> AppStore:
        return AppStore(cutting, shop.root.read_bytes(), tmp_path, ResumableFetcher(
            tmp_path / "partial", retries=retries, backoff_s=0.01))

    first = client(retries=0)
    first.refresh()
    with pytest.raises(AppStoreError) as caught:
        first.download("models/demo-detector/1.0.0/model.onnx", tmp_path / "model.onnx")
    assert caught.value.reason == "offline"
    [partial] = (tmp_path / "partial").iterdir()
    half = partial.stat().st_size
    assert half > 0
    second = client(retries=0)  # the daemon restarted: a new fetcher finds the partial file
    second.refresh()
    second.download("models/demo-detector/1.0.0/model.onnx", tmp_path / "model.onnx")
    assert Cutting.ranges == [f"bytes={half}-"]


def test_an_idle_refresh_is_cheap(shop: Shop, tmp_path: Path) -> None:
    client = shop.client(tmp_path)
    client.refresh()
    client.channel("stable")
    fetcher = client._fetcher
    assert isinstance(fetcher, ResumableFetcher)
    requests, received = fetcher.requests, fetcher.bytes_received
    client.refresh()
    client.channel("stable")
    idle_requests, idle_bytes = fetcher.requests - requests, fetcher.bytes_received - received
    timestamp = (shop.repo / "metadata" / "timestamp.json").stat().st_size
    assert idle_requests <= 2 and idle_bytes <= timestamp, (idle_requests, idle_bytes)


# ------------------------------------------------------------------ desired state


def test_desired_state_follows_the_channel_its_rollout_and_the_sites_subscriptions() -> None:
    catalog = Catalog(1, [CatalogEntry("app", "fall-watch", v, f"apps/fall-watch/{v}/app.json")
                          for v in ("0.9.0", "0.10.0")])
    base = ChannelDoc(channel="stable", version=3, apps={"ppe-watch": "1.0.0"})
    assert desired_apps(base, "dev-1", "", ["fall-watch"], catalog) == (
        {"ppe-watch": "1.0.0", "fall-watch": "0.10.0"}, None), "the newest subscribed version"
    rollout = Rollout(id="r4", apps={"ppe-watch": "1.1.0"}, groups=["canary"])
    staged = base.model_copy(update={"rollout": rollout})
    assert desired_apps(staged, "dev-1", "canary", [], catalog) == ({"ppe-watch": "1.1.0"}, "r4")
    assert desired_apps(staged, "dev-1", "", [], catalog) == ({"ppe-watch": "1.0.0"}, None)
    halted = base.model_copy(update={"rollout": rollout.model_copy(update={"halted": True})})
    assert desired_apps(halted, "dev-1", "canary", [], catalog) == ({"ppe-watch": "1.0.0"}, None), \
        "a halted rollout sends its devices back"
    everyone = base.model_copy(update={"rollout": Rollout(id="r5", apps={"ppe-watch": "1.1.0"}, percent=100)})
    assert desired_apps(everyone, "dev-9", "", [], catalog)[1] == "r5"


def test_a_staged_rollout_its_canary_refuses_is_halted_and_the_canary_keeps_serving(
        make_daemon: DaemonFactory, shop: Shop) -> None:
    d = appliance(make_daemon, shop, 'group = "canary"\n')
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0")
    # 1.1.0 asks for more memory than any partition here has: the canary cannot take it
    manifest = json.loads(write_app(shop.folder / "app-1.1.0.json", "1.1.0").read_text())
    manifest["resources"] = {"memory_mb": 10_000_000}
    (shop.folder / "app-1.1.0.json").write_text(json.dumps(manifest))
    ok(shop.repo, "publish", "app", str(shop.folder / "app-1.1.0.json"))
    ok(shop.repo, "channel", "set", "stable", "--app", "ppe-watch=1.1.0", "--group", "canary",
       "--max-unhealthy-share", "0.2")
    sync_now(d)
    link = wait_until(lambda: (s := d.status()["appstore"])["refused"] and s, 30, what="the canary's refusal")
    assert link["rollout"] and "needs 10000000 MB" in link["refused"]["ppe-watch"], link

    def halted() -> dict[str, Any] | None:
        return next((r for r in shop.fleet()["rollouts"] if r["state"] == "halted"), None)

    rollout = wait_until(halted, 30, what="the AppStore halting the rollout")
    assert rollout["unhealthy"][0]["device"] == d.device and "ppe-watch 1.1.0 refused" in rollout["reason"]
    [device] = shop.fleet()["devices"]
    assert "needs 10000000 MB" in device["last_error"], "the fleet view says why"
    assert serving(d, "ppe-watch", "1.0.0"), "the canary keeps serving what it had"
    sync_now(d)
    wait_until(lambda: d.status()["appstore"]["rollout"] is None and d.status()["appstore"]["state"] == "in sync",
               30, what="the canary back on the channel's own versions")


def test_a_version_that_does_not_serve_is_rolled_back_and_refused(make_daemon: DaemonFactory, shop: Shop,
                                                                  models: dict[str, Path]) -> None:
    d = appliance(make_daemon, shop, "activation_timeout_s = 6\n[runtime]\nload_timeout_s = 2\n"
                                     "strikes_before_quarantine = 1\nrestart_backoff_min_s = 0.1\n")
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 60, what="ppe-watch 1.0.0")
    ok(shop.repo, "publish", "model", str(models["demo-load-hang"]))  # hangs while it loads
    manifest = json.loads(write_app(shop.folder / "app-1.1.0.json", "1.1.0", "demo-load-hang").read_text())
    manifest["rules"][0]["labels"] = ["red"]  # a label this model has: the install is accepted, the load hangs
    (shop.folder / "app-1.1.0.json").write_text(json.dumps(manifest))
    ok(shop.repo, "publish", "app", str(shop.folder / "app-1.1.0.json"))
    ok(shop.repo, "channel", "set", "stable", "--app", "ppe-watch=1.1.0")
    sync_now(d)
    link = wait_until(lambda: (s := d.status()["appstore"])["refused"] and s, 60, what="the refusal")
    why = link["refused"]["ppe-watch"]
    assert "1.1.0 did not serve within 6 s" in why and "rolled back to 1.0.0" in why, why
    wait_until(lambda: serving(d, "ppe-watch", "1.0.0"), 30, what="1.0.0 serving again")
    [device] = shop.fleet()["devices"]
    assert device["apps"]["ppe-watch"]["state"] == "refused" and "rolled back" in device["last_error"]
