"""Zero-touch provisioning: the maker, the owner and a blank box as three folders, a real AppStore on loopback,
real ECDSA keys, X.509 certificates and DSSE envelopes, the real CLIs (``provision``, ``appliance provision``)
and the real daemon.

The bundle reaches the box once from the AppStore's bootstrap endpoint and once on a "USB stick" (a folder
the box is told to look in). Every bad input is a bundle (or an AppStore) a box meets in the field; for each
the test checks that nothing was applied (settings file, trusted root, admin) and that the reason a person
reads names what was wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from base64 import b64decode, b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, expect

from appliance.console.i18n import translations
from appliance.demo.scene import render_frame
from appliance.provision import agent, proof
from appliance.settings import load_settings
from appstore.server import build_app
from formats.provisioning import ProvisionState
from pki.certs import Identity, common_name, issued_by, load_certificate, name, new_key, signing_request
from provisioning.documents import make_bundle, make_voucher, read_site
from provisioning.factory import Factory
from provisioning.identity import make_ca, make_device, make_owner, prove
from tests.conftest import ROOT, Daemon, Publisher, Subscriber, free_port, new_daemon, port_open, wait_until
from tests.test_appstore import ok
from tests.test_broker_auth import make_pki
from tests.test_console_browser import new_page
from tests.test_sync import Shop, make_shop

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
_serials = iter(range(1, 1000))


def provision(*args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "provisioning.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False, env=env)
    assert r.returncode == 0, f"provision {' '.join(args)} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def appliance(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Office:
    """The maker's and the owner's folders, made with the real CLI once, and the AppStore they use."""

    maker: Path
    owner: Path
    shop: Shop
    password_hash: str
    folder: Path


@pytest.fixture(scope="module")
def office(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Office]:
    folder = tmp_path_factory.mktemp("provisioning")
    shop = make_shop(folder, models)
    maker, owner = folder / "maker", folder / "owner"
    assert "made the maker CA" in provision("maker", "init", "--dir", str(maker), "--name", "Acme Edge")
    provision("owner", "init", "--dir", str(owner), "--name", "Coal Group Ops")
    ok(shop.repo, "makers", "add", str(maker / "ca.pem"))
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "users", "hash-password", "site-admin",
                        "--password-stdin"], input=PASSWORD + "\n", cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=True)
    yield Office(maker, owner, shop, r.stdout.strip(), folder)
    shop.server.should_exit = True


@dataclass
class Box:
    """A blank box: its factory identity and factory settings, nothing of any site."""

    serial: str
    daemon: Daemon  # not started; its config file is the factory's settings
    voucher: Path
    site: Path  # the owner's site.toml for it
    usb: Path  # where its "USB stick" is mounted

    @property
    def config(self) -> Path:
        return self.daemon.config

    @property
    def state(self) -> Path:
        return self.daemon.state_dir

    def provision_state(self) -> ProvisionState:
        path = self.state / "provisioning" / "state.json"
        return ProvisionState.model_validate_json(path.read_bytes()) if path.exists() else ProvisionState()

    def look(self) -> ProvisionState:
        """One pass of the first-boot agent over the USB stick (in this process: the bad inputs are many)."""
        return agent(self.config, load_settings(self.config), [str(self.usb)]).run(wait=False)


def blank_box(tmp_path: Path, office: Office, bootstrap: str | None = None, site_extra: str = "") -> Box:
    serial = f"SN-{next(_serials):04d}"
    d = new_daemon(tmp_path)
    args = ["device", "make", serial, "--maker", str(office.maker), "--state-dir", str(d.state_dir)]
    if bootstrap:
        args += ["--bootstrap-url", bootstrap]
    assert f"gave box {serial} its factory identity" in provision(*args)
    voucher = tmp_path / f"{serial}.voucher.json"
    provision("voucher", serial, "--maker", str(office.maker), "--owner", str(office.owner / "owner.pem"),
              "--out", str(voucher))
    device = f"site-{serial.lower()}"
    d.device = device
    site = tmp_path / f"{serial}.site.toml"
    shutil.copy(office.shop.root, tmp_path / "root.json")
    site.write_text(textwrap.dedent(f"""\
        serial = "{serial}"
        device_id = "{device}"
        site = "Mine 3, shaft A"
        timezone = "Asia/Shanghai"
        [appstore]
        url = "{office.shop.url}/"
        root = "root.json"
        channel = "stable"
        [admin]
        name = "site-admin"
        password_hash = "{office.password_hash}"
        """) + textwrap.dedent(site_extra))
    usb = tmp_path / f"usb-{serial}"
    usb.mkdir()
    return Box(serial, d, voucher, site, usb)


def factory_settings(box: Box) -> bytes:
    return box.config.read_bytes()


def assert_nothing_applied(box: Box, factory: bytes) -> None:
    assert box.config.read_bytes() == factory, "the settings file is as the factory left it"
    assert not (box.state / "provisioning" / "root.json").exists(), "no trusted root was placed"
    db = box.state / "appliance.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0, "no admin was made"
    assert box.provision_state().state == "unprovisioned"


def stick(box: Box, bundle: bytes) -> None:
    path = box.usb / "appliance" / box.serial / "provisioning.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bundle)


def site_bundle(office: Office, box: Box, **changes: Any) -> bytes:
    """The bundle `provision site make` makes for ``box`` (through the library, with the changes a test needs)."""
    owner = changes.pop("owner", None) or Identity.load(office.owner, "owner", "owner")
    voucher = changes.pop("voucher", None) or box.voucher.read_bytes()
    conveyed = read_site(box.site, now=changes.pop("now", None))
    if changes:
        conveyed = conveyed.model_copy(update=changes)
    return make_bundle(voucher, owner, conveyed, "voucher")


def events_for(d: Daemon, sub: Subscriber, deadline_s: float) -> dict[str, Any]:
    pub = Publisher(d.mqtt_port)
    try:
        found: dict[str, Any] = wait_until(
            lambda: (pub.publish("cameras/cam1/frame", render_frame(0.0, 0)), _event(sub))[1], deadline_s,
            interval=0.2, what="an event over MQTT")
        return found
    finally:
        pub.close()


def _event(sub: Subscriber) -> dict[str, Any] | None:
    while not sub.messages.empty():
        _, payload, _ = sub.messages.get()
        doc: dict[str, Any] = json.loads(payload)
        return doc
    return None


# ---------------------------------------------------------------- the whole path

def test_a_blank_box_provisions_itself_from_the_bootstrap_endpoint_enrols_and_raises_its_first_event(
        tmp_path: Path, office: Office) -> None:
    box = blank_box(tmp_path, office, bootstrap=f"{office.shop.url}/")
    out = provision("site", "make", str(box.site), "--owner", str(office.owner), "--voucher", str(box.voucher),
                    "--register", office.shop.url, env={**os.environ, "APPSTORE_TOKEN": office.shop.admin})
    assert f"registered box {box.serial} with {office.shop.url} as {box.daemon.device}" in out

    started = time.monotonic()
    r = appliance(box.config, "provision", "--usb", str(box.usb), "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert f"provisioned: {box.daemon.device} (Mine 3, shaft A)" in r.stdout
    provisioned = time.monotonic() - started
    box.daemon.start()
    sub = Subscriber(box.daemon.mqtt_port, f"appliance/{box.daemon.device}/events")
    try:
        wait_until(lambda: any(a["name"] == "ppe-watch" and a["state"] == "serving"
                               for a in box.daemon.status()["apps"]), 60, interval=0.2,
                   what="the channel's app installed and serving")
        event = events_for(box.daemon, sub, 30)
    finally:
        sub.close()
    first_event = time.monotonic() - started
    print(f"\nblank box to provisioned: {provisioned:.1f} s; to the first event: {first_event:.1f} s")
    assert event["app"] == "ppe-watch"

    # the box is in the fleet under the owner's name for it, on the owner's channel
    fleet = office.shop.fleet()
    device = next(d for d in fleet["devices"] if d["id"] == box.daemon.device)
    assert device["channel"] == "stable"
    # the site staff log in with the admin the owner set
    login = httpx.post(f"{box.daemon.base_url}/api/v1/login", json={"user": "site-admin", "password": PASSWORD},
                       timeout=10)
    assert login.status_code == 200, login.text
    page = httpx.get(f"{box.daemon.base_url}/system", cookies=login.cookies, timeout=10,
                     headers={"Accept-Language": "en"})
    assert page.status_code == 200
    panel = page.text.split('id="provisioning"', 1)[1].split("</section>", 1)[0]
    for shown in ("Provisioned", box.serial, "Mine 3, shaft A", "Coal Group Ops", "enrolled with"):
        assert shown in panel, f"the console's Provisioning panel shows {shown!r}"
    settings = load_settings(box.config)
    assert settings.device_id == box.daemon.device and settings.timezone == "Asia/Shanghai"
    assert settings.appstore.device_token, "the operational token from enrolment is in the settings"
    assert box.config.stat().st_mode & 0o077 == 0, "the settings hold a token: readable by the appliance only"
    steps = [(s.step, s.outcome) for s in box.provision_state().steps]
    assert ("apply", "ok") in steps and steps[-1] == ("enrol", "ok")
    with sqlite3.connect(box.state / "appliance.db") as db:
        actions = [a for (a,) in db.execute("SELECT action FROM audit_log WHERE actor = 'provisioning'")]
    assert actions[:3] == ["users.add", "provisioning.apply", "provisioning.enrol"]
    box.daemon.stop()


def test_a_box_enrols_for_a_client_certificate_and_syncs_from_an_appstore_that_asks_for_one(
        tmp_path: Path, office: Office) -> None:
    """The AppStore as a real site runs it behind TLS: `appstore serve --client-certificates` takes only
    clients with a certificate from its fleet CA, and a second port serves bootstrap and enrolment to boxes
    that have none yet. The box sends a CSR with its enrolment and syncs with the certificate it gets."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    port, enrol_port = free_port(), free_port()
    box = blank_box(tmp_path, office)
    server = subprocess.Popen(
        [sys.executable, "-m", "appstore.cli", "--repo", str(office.shop.repo), "serve", "--port", str(port),
         "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), "--client-certificates",
         "--bootstrap-port", str(enrol_port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: port_open(port) and port_open(enrol_port), 30, what="the HTTPS AppStore")
        main, enrol_url = f"https://127.0.0.1:{port}", f"https://127.0.0.1:{enrol_port}"
        trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        shutil.copy(pki / "ca.pem", tmp_path / "appstore-ca.pem")
        box.site.write_text(box.site.read_text().replace(f'url = "{office.shop.url}/"', f'url = "{main}/"').replace(
            'channel = "stable"\n', f'channel = "stable"\nca = "appstore-ca.pem"\nenrol_url = "{enrol_url}/"\n'))
        provision("site", "make", str(box.site), "--owner", str(office.owner), "--voucher", str(box.voucher),
                  "--register", office.shop.url, "--out", str(box.usb),
                  env={**os.environ, "APPSTORE_TOKEN": office.shop.admin})

        # without a certificate from the fleet CA the main address lets nobody in; the enrolment port serves
        # nothing else
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{main}/metadata/timestamp.json", verify=trust, timeout=10)
        other = httpx.get(f"{enrol_url}/metadata/timestamp.json", verify=trust, timeout=10)
        assert other.status_code == 404 and "only /v1/bootstrap and /v1/enrol" in other.text

        # a proof whose CSR was swapped for another key's does not verify: the CSR is bound into the signature
        factory = Factory.load(box.state)
        good = proof(factory, "enrol", signing_request(new_key(), name(box.daemon.device)).decode())
        swapped = good.model_copy(update={"csr": signing_request(new_key(), name(box.daemon.device)).decode()})
        refused = httpx.post(f"{enrol_url}/v1/enrol", content=swapped.model_dump_json(), verify=trust, timeout=10)
        assert refused.status_code == 403 and "signature is not the device key's" in refused.text, refused.text

        r = appliance(box.config, "provision", "--usb", str(box.usb), "--timeout", "60", "--no-page")
        assert r.returncode == 0, r.stderr
        settings = load_settings(box.config)
        assert settings.appstore.cert_file and settings.appstore.key_file
        cert = load_certificate(settings.appstore.cert_file.read_bytes(), "the box's client certificate")
        assert common_name(cert) == box.daemon.device
        assert issued_by(cert, load_certificate((office.shop.repo / "fleet-ca" / "ca.pem").read_bytes(), "fleet CA"))
        assert settings.appstore.key_file.stat().st_mode & 0o077 == 0, "the box's key is the appliance's alone"
        assert not list(office.shop.repo.rglob("appstore-client.key")), "the AppStore never had the box's key"

        box.daemon.start()
        wait_until(lambda: any(a["name"] == "ppe-watch" and a["state"] == "serving"
                               for a in box.daemon.status()["apps"]), 60, interval=0.2,
                   what="the channel's app installed over the client-certificate address")
        wait_until(lambda: box.daemon.status()["appstore"]["state"] == "in sync", 30, what="the box in sync")
    finally:
        box.daemon.stop()
        server.terminate()
        server.wait(20)


def test_a_box_without_a_bootstrap_url_takes_its_bundle_from_a_usb_stick_and_a_newer_one_reprovisions_it(
        tmp_path: Path, office: Office) -> None:
    box = blank_box(tmp_path, office)
    out = provision("site", "make", str(box.site), "--owner", str(office.owner), "--voucher", str(box.voucher),
                    "--out", str(box.usb))
    bundle = box.usb / "appliance" / box.serial / "provisioning.json"
    assert str(bundle) in out and bundle.stat().st_mode & 0o077 == 0
    ok(office.shop.repo, "bootstrap", "add", str(bundle))  # the owner registers the box for its enrolment

    r = appliance(box.config, "provision", "--usb", str(box.usb), "--timeout", "60")
    assert r.returncode == 0, r.stderr
    first = box.provision_state()
    assert first.state == "provisioned" and first.source == str(bundle)
    token = load_settings(box.config).appstore.device_token

    # the same stick again: nothing changes
    assert box.look().version == first.version and load_settings(box.config).appstore.device_token == token

    # a newer configuration from the same owner, with another channel group: applied, and enrolled again
    text = box.site.read_text().replace('channel = "stable"', 'channel = "stable"\ngroup = "canary"')
    box.site.write_text(text.replace('serial = ', f'version = {first.version + 1}\nserial = ', 1))
    stick(box, site_bundle(office, box))
    ok(office.shop.repo, "bootstrap", "add", str(bundle))
    again = agent(box.config, load_settings(box.config), [str(box.usb)]).run(wait=False)
    assert again.state == "provisioned" and again.version == first.version + 1
    assert load_settings(box.config).appstore.group == "canary"
    assert load_settings(box.config).appstore.device_token != token, "a new token; the old one no longer works"
    ids = [d["id"] for d in office.shop.fleet()["devices"]]
    assert ids.count(box.daemon.device) == 1, "enrolling again is the same device, never a second one"

    # and the older one, replayed: refused, and the box keeps the newer one
    old = box.site.read_text().replace(f"version = {first.version + 1}", f"version = {first.version}")
    box.site.write_text(old)
    stick(box, site_bundle(office, box))
    state = box.look()
    assert state.version == first.version + 1
    last = state.steps[-1]
    assert last.outcome == "refused" and "older than version" in last.message and "replayed" in last.message


# ---------------------------------------------------------------- bad input: nothing applied

def _tampered(bundle: bytes) -> bytes:
    doc = json.loads(bundle)
    payload = json.loads(b64decode(doc["conveyed"]["payload"]))
    payload["appstore"]["channel"] = "attacker"
    doc["conveyed"]["payload"] = b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(doc).encode()


BAD = {
    "voucher by an unknown maker": ("voucher", "not signed by a maker this box trusts"),
    "voucher for another serial": ("voucher", "the voucher is for box SN-9999"),
    "expired voucher": ("voucher", "expired on"),
    "owner other than the voucher's": ("owner certificate", "is not the one the voucher names"),
    "conveyed signed by another owner": ("conveyed information", "not signed by the owner the voucher names"),
    "conveyed altered after signing": ("conveyed information", "altered after signing"),
    "expired conveyed information": ("conveyed information", "expired on"),
    "truncated bundle": ("bundle", "not valid JSON"),
    "not JSON": ("bundle", "not valid JSON"),
    "settings that do not validate": ("settings", "settings: broker.port"),
    "settings naming what the conveyed information sets": ("settings", "settings.device_id: set by the conveyed"),
}


def _bad_bundle(case: str, office: Office, box: Box) -> bytes:
    maker = Identity.load(office.maker, "ca", "maker")
    owner_pem = (office.owner / "owner.pem").read_bytes()
    if case == "voucher by an unknown maker":
        return site_bundle(office, box, voucher=make_voucher(make_ca("Rogue Works"), box.serial, owner_pem, 30))
    if case == "voucher for another serial":
        return site_bundle(office, box, voucher=make_voucher(maker, "SN-9999", owner_pem, 30))
    if case == "expired voucher":
        return site_bundle(office, box, voucher=make_voucher(maker, box.serial, owner_pem, 1, now=time.time() - 3 * 86400))
    if case == "owner other than the voucher's":
        return site_bundle(office, box, owner=make_owner("Someone Else"))
    if case == "conveyed signed by another owner":
        doc = json.loads(site_bundle(office, box))
        other = json.loads(site_bundle(office, box, owner=make_owner("Someone Else")))
        doc["conveyed"] = other["conveyed"]  # the voucher's owner certificate, another owner's signature
        return json.dumps(doc).encode()
    if case == "conveyed altered after signing":
        return _tampered(site_bundle(office, box))
    if case == "expired conveyed information":
        box.site.write_text(box.site.read_text().replace("[appstore]", "valid_days = 1\n[appstore]"))
        return site_bundle(office, box, now=time.time() - 2 * 86400)
    if case == "truncated bundle":
        good = site_bundle(office, box)
        return good[: len(good) // 2]
    if case == "not JSON":
        return b"\x89PNG\r\n not a bundle"
    if case == "settings that do not validate":
        box.site.write_text(box.site.read_text() + '[settings.broker]\nport = "eighteen eighty-three"\n')
        return site_bundle(office, box)
    if case == "settings naming what the conveyed information sets":
        box.site.write_text(box.site.read_text() + '[settings]\ndevice_id = "sneaky"\n')
        return site_bundle(office, box)
    raise AssertionError(case)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_bundle_is_refused_with_its_reason_and_nothing_of_it_is_applied(tmp_path: Path, office: Office,
                                                                               case: str) -> None:
    box = blank_box(tmp_path, office)
    factory = factory_settings(box)
    stick(box, _bad_bundle(case, office, box))
    state = box.look()
    step, words = BAD[case]
    refused = [s for s in state.steps if s.outcome == "refused"]
    assert refused, f"nothing refused: {state.steps}"
    assert refused[-1].step == step and words in refused[-1].message, refused[-1]
    assert_nothing_applied(box, factory)


def test_the_cli_says_why_a_box_is_not_provisioned_and_exits_3(tmp_path: Path, office: Office) -> None:
    box = blank_box(tmp_path, office)
    stick(box, _tampered(site_bundle(office, box)))
    r = appliance(box.config, "provision", "--usb", str(box.usb), "--once")
    assert r.returncode == 3 and "not provisioned yet" in r.stderr
    assert "conveyed information: not signed by the owner the voucher names" in r.stderr
    assert "altered after signing" in r.stderr


def test_a_box_its_owner_did_not_register_is_refused_enrolment_and_keeps_asking(tmp_path: Path, office: Office) -> None:
    box = blank_box(tmp_path, office)
    stick(box, site_bundle(office, box))  # on the stick, but never registered with the AppStore
    state = box.look()
    assert state.state == "applied", "the configuration is the owner's, so it is applied"
    last = state.steps[-1]
    assert last.step == "enrol" and last.outcome == "refused" and "not registered by its owner" in last.message
    assert box.daemon.device not in [d["id"] for d in office.shop.fleet()["devices"]]
    assert not load_settings(box.config).appstore.device_token


def _serve_on(port: int, repo: Path) -> uvicorn.Server:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(build_app(repo), log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    wait_until(lambda: server.started, 10, what="the AppStore server")
    return server


def test_an_appstore_not_there_at_first_boot_is_asked_again_until_it_answers_and_the_console_shows_the_wait(
        tmp_path: Path, office: Office, browser: Browser) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    box = blank_box(tmp_path, office, bootstrap=url)
    box.site.write_text(box.site.read_text().replace(office.shop.url, url))
    bundle = tmp_path / "bundle"
    provision("site", "make", str(box.site), "--owner", str(office.owner), "--voucher", str(box.voucher),
              "--out", str(bundle))
    ok(office.shop.repo, "bootstrap", "add", str(bundle / "appliance" / box.serial / "provisioning.json"))
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--config", str(box.config), "provision",
                             "--usb", str(box.usb), "--timeout", "120"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    server = None
    try:
        wait_until(lambda: any(s.step == "find" and s.outcome == "waiting" and "cannot be reached" in s.message
                               for s in box.provision_state().steps), 60, interval=0.2,
                   what="the agent waiting for the AppStore")
        # whoever opens the console's address meanwhile sees the wait and its reason, with no login
        page = new_page(browser, box.daemon)
        page.goto("/login")
        expect(page.locator("h1")).to_have_text("This appliance is setting itself up")
        expect(page.locator("#provisioning")).to_contain_text(box.serial)
        expect(page.locator("#provisioning tbody")).to_contain_text("cannot be reached")
        page.locator("form.lang button[value=zh]").click()
        expect(page.locator("h1")).to_have_text(translations("zh").gettext("This appliance is setting itself up"))
        assert page.locator("form[action='/login'], input[type=password]").count() == 0, "read-only: no forms"
        page.context.close()
        server = _serve_on(port, office.shop.repo)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None:
            server.should_exit = True
    assert proc.returncode == 0, err
    assert box.provision_state().state == "provisioned"
    assert "cannot be reached" in err, "the wait was logged"
    with pytest.raises(httpx.ConnectError):  # the address is free again for the console
        httpx.get(box.daemon.base_url, timeout=5)


def test_enrolment_and_bootstrap_refuse_a_box_that_cannot_prove_its_factory_identity(tmp_path: Path,
                                                                                    office: Office) -> None:
    box = blank_box(tmp_path, office)
    factory = Factory.load(box.state)
    good = proof(factory, "enrol")
    rogue = make_ca("Acme Edge")  # same name, not the maker's key
    impostor = make_device(box.serial, rogue)
    cert, sig = prove(impostor, "enrol", time.time())
    cases = {
        "a certificate from a maker the AppStore does not trust": (
            {"certificate": cert, "purpose": "enrol", "time": time.time(), "signature": sig}, 403,
            "not issued by a maker this AppStore trusts"),
        "a proof made for the bootstrap": (proof(factory, "bootstrap").model_dump(), 403, "for bootstrap, not enrol"),
        "a stale proof": ({**good.model_dump(), "time": good.time - 3600}, 403, "check the box's clock"),
        "another key's signature": ({**good.model_dump(), "signature": sig}, 403, "not the device key's"),
        "not a proof": ({"hello": 1}, 400, "device proof"),
    }
    for what, (body, status, words) in cases.items():
        r = httpx.post(f"{office.shop.url}/v1/enrol", json=body, timeout=10)
        assert r.status_code == status and words in r.json()["error"], (what, r.status_code, r.text)
    # the bootstrap endpoint: a proof for another box's serial, and a box nobody registered
    r = httpx.post(f"{office.shop.url}/v1/bootstrap/SN-9999", json=proof(factory, "bootstrap").model_dump(), timeout=10)
    assert r.status_code == 403 and "not SN-9999's" in r.json()["error"]
    r = httpx.post(f"{office.shop.url}/v1/bootstrap/{box.serial}", json=proof(factory, "bootstrap").model_dump(),
                   timeout=10)
    assert r.status_code == 404 and "no provisioning bundle is registered" in r.json()["error"]
    # a proof is good once
    body = proof(factory, "bootstrap").model_dump()
    assert httpx.post(f"{office.shop.url}/v1/bootstrap/{box.serial}", json=body, timeout=10).status_code == 404
    r = httpx.post(f"{office.shop.url}/v1/bootstrap/{box.serial}", json=body, timeout=10)
    assert r.status_code == 403 and "used already" in r.json()["error"]
    # registering needs an admin token, and a bundle that verifies
    bad = _tampered(site_bundle(office, box))
    r = httpx.put(f"{office.shop.url}/v1/bootstrap/{box.serial}", content=bad, timeout=10)
    assert r.status_code == 401
    r = httpx.put(f"{office.shop.url}/v1/bootstrap/{box.serial}", content=bad, timeout=10,
                  headers={"Authorization": f"Bearer {office.shop.admin}"})
    assert r.status_code == 400 and "does not verify" in r.json()["error"]


def test_a_factory_reset_wipes_the_site_and_keeps_the_factory_identity(tmp_path: Path, office: Office) -> None:
    box = blank_box(tmp_path, office)
    factory = factory_settings(box)
    (box.state / "releases" / "0.1.0").mkdir(parents=True)  # the software the launcher runs is the box's
    (box.state / "current").symlink_to("releases/0.1.0")
    stick(box, site_bundle(office, box))
    ok(office.shop.repo, "bootstrap", "add", str(box.usb / "appliance" / box.serial / "provisioning.json"))
    assert box.look().state == "provisioned"
    assert appliance(box.config, "factory-reset").returncode == 2, "not without --yes"
    r = appliance(box.config, "factory-reset", "--yes")
    assert r.returncode == 0, r.stderr
    assert box.config.read_bytes() == factory
    assert sorted(p.name for p in box.state.iterdir()) == ["current", "factory", "releases"]
    assert box.look().state == "provisioned", "the box provisions itself again from the stick"
