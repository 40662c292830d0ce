"""One connection to the AppStore for everything: over HTTPS with a private CA and a required client
certificate, the sync and the sample upload both work; without the client certificate both are refused,
and each says why in words that name the settings.

A real AppStore on loopback behind TLS (uvicorn with a CA it checks clients against), real certificates made
here, and the real daemon.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from appliance.demo.scene import render_frame
from appstore.server import build_app
from tests.conftest import Daemon, DaemonFactory, Publisher, wait_until
from tests.test_appstore import ok, write_app
from tests.test_broker_auth import make_pki

pytestmark = pytest.mark.slow


class TlsShop:
    def __init__(self, tmp_path: Path, models: dict[str, Path]) -> None:
        self.pki = tmp_path / "pki"
        self.pki.mkdir()
        make_pki(self.pki)
        self.repo = tmp_path / "appstore"
        ok(self.repo, "keys", "init")
        ok(self.repo, "publish", "model", str(models["demo-detector"]))
        ok(self.repo, "publish", "app", str(write_app(tmp_path / "app-1.0.0.json")))
        ok(self.repo, "channel", "set", "stable", "--app", "ppe-watch=1.0.0")
        self.admin = ok(self.repo, "admin-token").strip().splitlines()[-1]
        self.root = tmp_path / "root.json"
        shutil.copy(self.repo / "metadata" / "1.root.json", self.root)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.server = uvicorn.Server(uvicorn.Config(
            build_app(self.repo), log_level="warning", lifespan="off",
            ssl_certfile=str(self.pki / "server.pem"), ssl_keyfile=str(self.pki / "server.key"),
            ssl_ca_certs=str(self.pki / "ca.pem"), ssl_cert_reqs=ssl.CERT_REQUIRED))
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        wait_until(lambda: self.server.started, 10, what="the HTTPS AppStore")
        self.url = f"https://127.0.0.1:{sock.getsockname()[1]}"

    def admin_get(self, path: str) -> Any:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        ctx.load_cert_chain(self.pki / "client.pem", self.pki / "client.key")
        r = httpx.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.admin}"}, verify=ctx, timeout=10)
        r.raise_for_status()
        return r.json()


@pytest.fixture
def tls_shop(tmp_path: Path, models: dict[str, Path]) -> Iterator[TlsShop]:
    shop = TlsShop(tmp_path, models)
    yield shop
    shop.server.should_exit = True


def appliance(make_daemon: DaemonFactory, shop: TlsShop, client_cert: bool) -> Daemon:
    d = make_daemon(start=False)
    token = ok(shop.repo, "devices", "add", d.device).strip().splitlines()[-1]
    cert = f'cert_file = "{shop.pki}/client.pem"\nkey_file = "{shop.pki}/client.key"\n' if client_cert else ""
    with d.config.open("a") as f:
        f.write(f'[appstore]\nurl = "{shop.url}/"\nroot = "{shop.root}"\nchannel = "stable"\n'
                f'device_token = "{token}"\nrefresh_s = 600\nretry_max_s = 2\nca_file = "{shop.pki}/ca.pem"\n{cert}'
                '[samples]\nupload = "full"\nupload_interval_s = 0.5\nretry_max_s = 2\n'
                '[samples.apps.ppe-watch]\nrandom_rate = 1.0\nnear_threshold = 0\ndedup_s = 0\n')
    return d


def send_frame(d: Daemon) -> None:
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(0.0, 0))
    finally:
        pub.close()


def test_sync_and_samples_share_the_tls_settings(make_daemon: DaemonFactory, tls_shop: TlsShop) -> None:
    d = appliance(make_daemon, tls_shop, client_cert=True)
    d.start()
    wait_until(lambda: any(a["name"] == "ppe-watch" and a["state"] == "serving" for a in d.status()["apps"]), 60,
               what="ppe-watch installed from the HTTPS AppStore")
    send_frame(d)
    received = wait_until(lambda: tls_shop.admin_get("/v1/samples")["samples"], 60, what="a sample in the inbox")
    assert received[0]["meta"]["device"] == d.device and received[0]["has_image"]
    fleet = wait_until(lambda: (f := tls_shop.admin_get("/v1/devices")) and f["devices"][0].get("apps") and f, 30,
                       what="its status report in the fleet view")
    assert fleet["devices"][0]["id"] == d.device and fleet["devices"][0]["apps"]["ppe-watch"]["version"] == "1.0.0"


def test_without_the_client_certificate_sync_and_samples_say_why(make_daemon: DaemonFactory, tls_shop: TlsShop,
                                                                models: dict[str, Path], tmp_path: Path) -> None:
    d = appliance(make_daemon, tls_shop, client_cert=False)
    d.cli("models", "add", str(models["demo-detector"]))  # installed on site, so that samples flow regardless
    d.cli("apps", "add", str(write_app(tmp_path / "local.json")))
    d.start()
    link = wait_until(lambda: (a := d.status()["appstore"]) and a.get("last_error") and a, 60,
                      what="the sync's refusal")
    for words in ("TLS", "no client certificate", "appstore.cert_file"):
        assert words in link["last_error"], link["last_error"]
    send_frame(d)
    upload = wait_until(lambda: (u := d.status()["samples"]["uploader"]) and u.get("last_error") and u, 60,
                        what="the uploader's refusal")
    assert "TLS" in upload["last_error"] and "appstore.cert_file" in upload["last_error"]
    assert upload["state"] == "retrying", "a link problem is retried, the sample stays queued"
    assert tls_shop.admin_get("/v1/samples")["samples"] == []
