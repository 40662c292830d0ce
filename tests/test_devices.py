"""Device access on a real site: the daemon runs Mosquitto (``broker.mode = "managed"``) from its device
registry, with TLS, client certificates from its own device CA, a password file, a CRL and an ACL; cameras
and sensors are real paho clients with the credentials ``appliance devices add`` handed over. The same site
again with Mosquitto run by systemd, as in the OS image (``broker.supervisor = "systemd"``: the test's
:class:`~tests.test_broker_unit.PathUnit` does what the image's units do)."""

from __future__ import annotations

import io
import json
import sqlite3
import ssl
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from playwright.sync_api import Browser, expect

from appliance.demo.scene import render_frame
from appliance.devices.activity import BrokerActivity
from pki.certs import issue, name
from tests.conftest import Daemon, DaemonFactory, free_port, new_daemon, wait_until, write_app
from tests.test_broker_unit import PathUnit
from tests.test_console_browser import add_users, log_in, new_page
from tests.test_console_pages import csrf_of
from tests.test_e2e import PERSON_RULE, serving

pytestmark = pytest.mark.slow


class Device:
    """A camera or sensor connecting with what its credentials folder says."""

    def __init__(self, folder: Path, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                 port: int | None = None, password: str | None = None, no_certificate: bool = False) -> None:
        connect = json.loads((folder / "connect.json").read_text())
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5,
                                  client_id=f"{connect['device']}-{free_port()}")
        self.refused: list[str] = []
        ctx = ssl.create_default_context(cafile=str(ca or folder / connect["ca"]))
        if ("client_certificate" in connect or cert) and not no_certificate:
            ctx.load_cert_chain(str(cert or folder / connect["client_certificate"]),
                                str(key or folder / connect["client_key"]))
        self.client.tls_set_context(ctx)
        if "username" in connect:
            self.client.username_pw_set(connect["username"], password or connect["password"])
        self.connected: bool | None = None
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connected", not rc.is_failure)
        self.client.on_disconnect = lambda c, u, f, rc, p: setattr(self, "connected", False)
        self.port = port or connect["port"]
        self.topic = connect["topic"]

    def connect(self) -> bool:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        wait_until(lambda: self.connected is not None, 10, what="an answer from the broker")
        return bool(self.connected)

    def publish(self, topic: str, payload: bytes) -> int:
        """The broker's reason code for a QoS 1 publish (0: accepted; 135: not authorised)."""
        codes: list[int] = []
        self.client.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        wait_until(lambda: codes, 10, what="the broker's PUBACK")
        return codes[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Site:
    """One managed box for the tests of this module: cam1, cam2 (certificates) and gas1 (password) enrolled with
    the CLI before it started, an admin and a viewer, the detector app serving."""

    d: Daemon
    cam1: Path
    cam2: Path
    gas: Path
    folder: Path
    unit: PathUnit | None  # Mosquitto's unit, where systemd runs it


@pytest.fixture(scope="module", params=["daemon", "systemd"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         models: dict[str, Path]) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("devices")
    systemd = request.param == "systemd"
    (folder / "run").mkdir()
    d = new_daemon(folder, free_port(), broker_extra=f"""
        device_host = "127.0.0.1"
        device_port = {free_port()}
        password_port = {free_port()}
        device_names = ["127.0.0.1"]
        supervisor = "{request.param}"
        run_dir = "{folder / 'run'}"
        """)
    d.config.write_text(d.config.read_text().replace('mode = "external"', 'mode = "managed"'))
    unit = PathUnit(d.state_dir / "broker" / "mosquitto.conf") if systemd else None
    d.cli("models", "add", str(models["demo-detector"]))
    d.cli("apps", "add", str(write_app(folder / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [PERSON_RULE])))
    add_users(d, {"boss": "admin", "watcher": "viewer"})
    creds = [add(d, folder, "cam1", "--kind", "camera"), add(d, folder, "cam2", "--kind", "camera"),
             add(d, folder, "gas1", "--kind", "sensor", "--password")]
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="the app serving")
    yield Site(d, *creds, folder, unit)
    d.stop()
    if unit is not None:
        unit.stop()


def events(d: Daemon, source: str) -> int:
    with sqlite3.connect(d.state_dir / "appliance.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM events WHERE source = ?", (source,)).fetchone()[0])


def add(d: Daemon, tmp_path: Path, device: str, *args: str) -> Path:
    out = tmp_path / f"{device}-creds"
    r = d.cli("devices", "add", device, *args, "--out", str(out))
    assert f"its credentials are in {out}/" in r.stdout
    return out


def test_a_camera_with_its_certificate_is_served_and_confined_to_its_topic_and_strangers_are_refused(
        site: Site, tmp_path: Path) -> None:
    d, cam1, cam2, gas = site.d, site.cam1, site.cam2, site.gas
    assert d.status()["broker"]["connected"], "the daemon is on its own broker with its own certificate"

    one = Device(cam1)
    assert one.connect()
    frame = render_frame(0.0, 0)
    assert one.publish("cameras/cam1/frame", frame) == 0
    wait_until(lambda: events(d, "cam1") > 0, 30, what="an event from cam1")
    assert one.publish("cameras/cam2/frame", frame) == 135, "cam1 may not publish as cam2"
    assert one.publish("appliance/x/commands", b"{}") == 135, "nor write the appliance's topics"

    two = Device(cam2)
    assert two.connect()

    # strangers: no certificate, a certificate of another CA, a wrong password
    assert not Device(cam1, no_certificate=True).connect(), "no client certificate, no connection"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    other = issue(name("other CA"), None, 30, ca=True)
    fake = issue(name("cam1"), other, 30, client=True)
    fake.save(stranger, "cam1")
    assert not Device(cam1, cert=stranger / "cam1.pem", key=stranger / "cam1.key").connect(), \
        "a certificate named cam1 from another CA is refused"
    assert not Device(gas, password="wrong").connect(), "a wrong password is refused"
    sensor = Device(gas)
    assert sensor.connect() and sensor.publish("sensors/gas1/telemetry", b'{"ts": 1, "ch4": 0.1}') == 0

    # what was refused is there for the admin: per device, and per address before a device was known
    def shown(device: str) -> dict[str, object]:
        return dict(json.loads(d.cli("devices", "show", device).stdout))

    wait_until(lambda: int(str(shown("cam1")["refusals"])) >= 2, 20, what="cam1's refused publishes counted")
    cam1_seen = shown("cam1")
    assert "appliance/x/commands" in str(cam1_seen["last_refusal"]) and cam1_seen["last_message"], cam1_seen
    assert shown("cam2")["refusals"] == 0 and shown("cam2")["last_message"] is None, "cam2 sent nothing yet"
    wait_until(lambda: "wrong user name or password" in d.cli("devices", "list").stdout, 20,
               what="the refused connections listed")
    listed = d.cli("devices", "list").stdout
    assert "sent no client certificate" in listed and "not from this appliance's device CA" in listed, listed
    assert "connected from there before" in listed, "the address is tied to the device last seen there"
    log = d.log()
    assert "Denied PUBLISH" not in log and "Received PUBLISH" not in log, "per-message lines stay out of the log"

    # the daemon's own certificate gives nothing on the devices' listener
    daemon = Device(cam1, cert=d.state_dir / "devices" / "daemon.pem", key=d.state_dir / "devices" / "daemon.key")
    assert daemon.connect() and daemon.publish("appliance/x/commands", b"{}") == 135
    daemon.close()
    # an id Mosquitto's files could not hold is refused before anything is written
    r = d.cli("devices", "add", "evil\nuser cam1", "--kind", "camera", "--out", str(tmp_path / "evil"), check=False)
    assert r.returncode == 2 and "device id" in r.stderr and not (tmp_path / "evil").exists()

    # revocation: cam1 is cut off and refused; cam2 stays connected
    d.cli("devices", "revoke", "cam1")
    wait_until(lambda: one.publish("cameras/cam1/frame", frame) == 135, 20, what="cam1's publish refused")
    one.close()
    assert not Device(cam1).connect(), "a revoked certificate cannot connect again"
    assert two.connected and two.publish("cameras/cam2/frame", frame) == 0, "cam2 was not dropped"
    d.cli("devices", "revoke", "gas1")
    wait_until(lambda: not sensor.connected, 20, what="the password device dropped")
    assert not Device(gas).connect()
    # new credentials for cam2: a session on the old key does not keep cam2's rights
    new_two = tmp_path / "cam2-renewed"
    d.cli("devices", "renew", "cam2", "--out", str(new_two))
    wait_until(lambda: not two.connected, 20, what="the session on cam2's old key dropped")
    two.close()
    assert not Device(cam2).connect(), "the replaced certificate is refused"
    renewed = Device(new_two)
    assert renewed.connect() and renewed.publish("cameras/cam2/frame", frame) == 0
    renewed.close()

    listed = d.cli("devices", "list").stdout
    assert "cam1" in listed and "revoked" in listed and "cam2" in listed
    log = d.log()
    for folder in (cam1, cam2, gas):
        for f in folder.iterdir():
            if f.suffix == ".key":
                assert f.read_text().splitlines()[1] not in log, "no key material in the log"
    assert json.loads((gas / "connect.json").read_text())["password"] not in log, "no password in the log"
    assert not list(d.state_dir.rglob("cam1.key")), "the device's key is not kept on the box"


@pytest.mark.parametrize("site", ["systemd"], indirect=True)
def test_under_systemd_the_broker_and_its_devices_stay_connected_while_the_daemon_restarts(
        site: Site, tmp_path: Path) -> None:
    """The image's layout: Mosquitto is not the daemon's child, so a daemon that restarts (an upgrade's switch,
    a crash) finds it running, reloads it with its files, and the cameras never notice."""
    d, unit = site.d, site.unit
    assert unit is not None and unit.pids, "Mosquitto was started by its unit, not by the daemon"
    creds = add(d, tmp_path, "cam9", "--kind", "camera")
    camera = Device(creds)
    wait_until(camera.connect, 20, what="cam9 let in once the daemon reloaded the broker")
    before = list(unit.pids)
    d.stop()
    assert camera.connected, "the broker outlives the daemon"
    logged = len(d.log())
    d.start()
    wait_until(lambda: serving(d, "ppe-watch"), 30, what="the app serving again")
    assert unit.pids == before and camera.connected, "the same Mosquitto, the same session"
    assert "Reloading config" in d.log()[logged:].split("managed Mosquitto up")[0], "the new daemon reloaded it"
    assert camera.publish("cameras/cam9/frame", render_frame(0.0, 0)) == 0
    wait_until(lambda: events(d, "cam9") > 0, 30, what="an event from cam9 after the restart")
    camera.close()


@pytest.mark.parametrize("site", ["daemon"], indirect=True)  # the console is the same whoever runs Mosquitto
def test_an_admin_enrols_a_camera_on_the_console_and_its_download_connects_and_others_cannot(
        site: Site, tmp_path: Path, browser: Browser) -> None:
    d = site.d
    page = new_page(browser, d)
    log_in(page, "boss", "/sources")
    page.locator("details:has(#add-device) > summary").click()
    page.locator("#add-device input[name=device]").fill("dock-cam")
    with page.expect_download() as download:
        page.locator("#add-device button[type=submit]").click()
    archive = tmp_path / "dock-cam.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "download")
    folder = tmp_path / "download" / "dock-cam"
    cam = Device(folder)
    assert cam.connect() and cam.publish("cameras/dock-cam/frame", render_frame(0.0, 0)) == 0
    wait_until(lambda: events(d, "dock-cam") > 0, 30, what="an event from the camera enrolled on the console")
    assert cam.publish("cameras/cam1/frame", render_frame(0.0, 0)) == 135, "not another camera's topic"
    assert not Device(folder, no_certificate=True).connect()
    wait_until(lambda: '"refusals": 1' in d.cli("devices", "show", "dock-cam").stdout, 20,
               what="the refused publish counted")
    page.reload()
    row = page.locator("#device-dock-cam")
    expect(row).to_contain_text("Active")
    expect(row).not_to_contain_text("never")  # its connection and its message were seen
    expect(row.locator(".refusals")).to_contain_text("published to cameras/cam1/frame")
    expect(page.locator("#refused")).to_contain_text("it sent no client certificate")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#device-dock-cam form[action$='/revoke'] button").click()
    expect(page.locator(".flash")).to_contain_text("Device revoked")
    wait_until(lambda: cam.publish("cameras/dock-cam/frame", render_frame(0.0, 0)) == 135, 20,
               what="the revoked camera refused")
    cam.close()
    page.context.close()
    audit = d.cli("devices", "show", "dock-cam").stdout
    assert '"revoked": null' not in audit

    viewer = new_page(browser, d)
    log_in(viewer, "watcher", "/sources")
    expect(viewer.locator("#device-dock-cam")).to_be_visible()
    assert viewer.locator("#add-device").count() == 0, "a viewer sees no enrolment form"
    for path, data in (("/sources/devices", {"device": "rogue", "kind": "camera"}),
                       ("/sources/devices/dock-cam/renew", {})):
        r = viewer.request.post(path, form={"csrf_token": csrf_of(viewer.content()), **data})
        assert r.status == 403, f"{path}: a viewer is refused on the server"
    viewer.context.close()
    forged = new_page(browser, d)
    log_in(forged, "boss", "/sources")
    r = forged.request.post("/sources/devices", form={"device": "rogue", "kind": "camera", "csrf_token": "forged"})
    assert r.status == 403 and "rogue" not in d.cli("devices", "list").stdout, "no CSRF token, no device"
    bundle = forged.request.get("/system/diagnostics.zip")
    assert bundle.status == 200
    with zipfile.ZipFile(io.BytesIO(bundle.body())) as z:
        text = "".join(z.read(n).decode(errors="replace") for n in z.namelist())
    key_line = (folder / "dock-cam.key").read_text().splitlines()[1]
    assert "PRIVATE KEY" not in text and key_line not in text, "no key material in the diagnostics bundle"
    forged.context.close()

    # last, as it ends the module's box: a daemon killed outright takes its Mosquitto with it, so that no
    # broker is left serving the old files
    pid = int((d.state_dir / "broker" / "mosquitto.pid").read_text())
    assert d.proc is not None
    d.proc.kill()
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes()
               .lower(), 10, what="Mosquitto ending with its daemon")


def test_managed_mode_names_a_missing_device_address_and_a_missing_mosquitto(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    d = make_daemon(broker_port=free_port(), start=False, broker_extra='mosquitto = "no-such-mosquitto"')
    d.config.write_text(d.config.read_text().replace('mode = "external"', 'mode = "managed"'))
    r = d.cli("run", check=False)
    assert r.returncode == 2 and "device_names: say how cameras and sensors reach this box" in r.stderr
    d.config.write_text(d.config.read_text().replace('mosquitto = "no-such-mosquitto"',
                                                     'mosquitto = "no-such-mosquitto"\ndevice_names = ["10.0.0.5"]'))
    r = d.cli("run", check=False)
    assert r.returncode != 0 and "'no-such-mosquitto' is not installed" in r.stderr
    assert "apt-get install mosquitto" in r.stderr


def test_the_broker_log_reader_credits_only_authenticated_names_and_keeps_refusals_by_address() -> None:
    """Lines as Mosquitto 2.0.11 writes them (recorded from the managed configuration)."""
    clock = iter(float(t) for t in range(100, 200))
    activity = BrokerActivity({8883: "certificate", 8884: "password"}, clock=lambda: next(clock))
    lines = [
        "New connection from 10.0.0.5:56468 on port 8883.",
        "New client connected from 10.0.0.5:56468 as cam1 (p5, c1, k60, u'cam1').",
        "Received PUBLISH from cam1 (d0, q0, r0, m0, 'cameras/cam1/frame', ... (60000 bytes))",
        "Denied PUBLISH from cam1 (d0, q1, r0, m1, 'cameras/cam2/frame', ... (1 bytes))",
        "Sending PUBACK to cam1 (m1, rc135)",
        # a client id that mimics a user name: only the last u'...' (the one Mosquitto authenticated) counts
        "New client connected from 10.0.0.7:1 as ok (p2, c1, k60, u'cam9') (p2, c1, k60, u'gas1').",
        "New client connected from 127.0.0.1:52397 as _appliance-box (p5, c1, k30, u'_appliance').",
        "Received PUBLISH from _appliance-box (d0, q1, r0, m3, 'appliance/box/status', ... (90 bytes))",
        "New connection from 10.0.0.5:39457 on port 8883.",
        "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
        "Client <unknown> disconnected: Protocol error.",
        "Client connection from 10.0.0.9 failed: error:0A0000C7:SSL routines::peer did not return a certificate.",
        "New connection from 10.0.0.9:54498 on port 8884.",
        "Sending CONNACK to 10.0.0.9 (0, 5)",
        "Client <unknown> disconnected, not authorised.",
        "New connection from 10.0.0.9:54500 on port 8884.",
        "Client <unknown> disconnected, not authorised.",
    ]
    assert [activity.observe(line) for line in lines] == [True] * len(lines)
    assert not activity.observe("mosquitto version 2.0.11 running"), "other lines are the caller's to log"
    devices, refused = activity.take()
    assert set(devices) == {"cam1", "gas1"}, "the daemon and a name in a client id are not devices"
    cam1 = devices["cam1"]
    assert cam1.last_connect and cam1.last_message and cam1.refusals == 1
    assert "cameras/cam2/frame" in cam1.last_refusal
    by_reason = {(r.address, r.listener, r.count): r for r in refused}
    assert set(by_reason) == {("10.0.0.5", "certificate", 1), ("10.0.0.9", "certificate", 1),
                              ("10.0.0.9", "password", 2)}
    assert by_reason[("10.0.0.5", "certificate", 1)].hint == "cam1", "cam1 connected from 10.0.0.5 before"
    assert "device CA" in by_reason[("10.0.0.5", "certificate", 1)].reason
    assert "no client certificate" in by_reason[("10.0.0.9", "certificate", 1)].reason
    assert "wrong user name or password" in by_reason[("10.0.0.9", "password", 2)].reason
    assert activity.take() == ({}, []), "what was taken is not handed over twice"
