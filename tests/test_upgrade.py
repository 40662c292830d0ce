"""The appliance upgrades itself: real releases of this tree, a real AppStore, the real launcher and daemon.

Each test has its own channel on one AppStore (built once for the module: publishing a release copies
its wheels) and its own box. The broker is a real Mosquitto that stays up while the daemon restarts,
as a site's does. What is asserted is what a site and a fleet engineer see: which release answers, what
the AppStore's fleet view says, what the database still holds.
"""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from appliance.demo.scene import render_frame
from appliance.store import SCHEMA_VERSION
from appliance.upgrade.install import has_wheel
from appstore.server import build_app
from formats.release import ReleaseManifest
from tests.conftest import ROOT, Mosquitto, Publisher, Subscriber, wait_until
from tests.test_appstore import ok, write_app
from tests.test_console_browser import PASSWORD, log_in, new_page
from tests.test_sync import sync_now
from tests.upgrade_fleet import BASE, GOOD, Box, Shop, build_releases, make_box, make_shop, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Shop]:
    folder = tmp_path_factory.mktemp("upgrade")
    made = make_shop(folder, models, build_releases(folder / "releases"))
    yield made
    made.server.should_exit = True


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv cache for every box of the module: each release environment hard-links from it."""
    return tmp_path_factory.mktemp("uv-cache")


_channels = iter(range(1000))


@pytest.fixture
def channel(shop: Shop) -> str:
    name = f"ch{next(_channels)}"
    ok(shop.repo, "channel", "set", name, "--app", "ppe-watch=1.0.0", "--appliance", BASE)
    return name


@pytest.fixture
def box(tmp_path: Path, shop: Shop, channel: str, mosquitto: Mosquitto, uv_cache: Path,
        request: pytest.FixtureRequest) -> Iterator[Box]:
    options: dict[str, Any] = getattr(request, "param", {})
    made = make_box(tmp_path, shop, channel, mosquitto.port, uv_cache, **options)
    made.start()
    try:
        made.wait_running(BASE)
        wait_for(lambda: any(a["state"] == "serving" for a in (made.status() or {}).get("apps", [])),
                 "ppe-watch serving on the base release")
        yield made
    finally:
        made.stop()


def audit(box: Box) -> list[str]:
    with sqlite3.connect(f"file:{box.root / 'appliance.db'}?mode=ro", uri=True) as db:
        return [r[0] for r in db.execute("SELECT action FROM audit_log ORDER BY id")]


def test_a_good_release_is_installed_beside_the_old_switched_to_confirmed_and_reported(
        shop: Shop, channel: str, box: Box) -> None:
    results = Subscriber(box.mqtt_port, f"appliance/{box.device}/results")
    pub = Publisher(box.mqtt_port)
    frame = render_frame(0.0, 0)
    answered: list[float] = []
    try:
        ok(shop.repo, "channel", "set", channel, "--appliance", GOOD)
        sync_now(box)

        def upgraded() -> bool:
            pub.publish("cameras/cam1/frame", frame)
            while not results.messages.empty():
                results.messages.get()
                answered.append(time.monotonic())
            s = box.running(GOOD)
            return bool(s and s["upgrade"]["state"] == "upgraded")

        wait_for(upgraded, f"{GOOD} upgraded", timeout=240)
        before = len(answered)
        wait_for(lambda: (pub.publish("cameras/cam1/frame", frame), not results.messages.empty())[1],
                 "a frame answered by the new release")
    finally:
        pub.close()
        results.close()
    assert before > 0, "frames were answered before the switch"
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    print(f"\nlongest gap between answered frames during the upgrade: {max(gaps):.1f} s")

    layout = box.layout
    assert layout.target(layout.current) == GOOD and layout.target(layout.previous) == BASE
    assert layout.installed(GOOD) and layout.installed(BASE), "both releases side by side"
    wait_for(lambda: box.history(), "the launcher recording the confirmation")
    assert [h["outcome"] for h in box.history()] == ["confirmed"]
    up = box.upgrade()
    assert up["running"] == GOOD and up["previous"] == BASE and up["desired"] == GOOD and up["launcher"]
    with sqlite3.connect(f"file:{box.root / 'appliance.db'}?mode=ro", uri=True) as db:
        [(detail,)] = db.execute("SELECT detail FROM audit_log WHERE action = 'upgrade.download'")
    download = json.loads(detail)
    assert download["files"] == 1 and 0 < download["bytes"] < 5_000_000, \
        f"only the appliance's own wheel is downloaded, not {download}"
    print(f"downloaded for the upgrade: {download['bytes']} bytes in {download['files']} file(s)")
    device = wait_for(lambda: (d := shop.device(box.device)) and d["version"] == GOOD and d["upgrade"]
                      and d["upgrade"]["state"] == "upgraded" and d, "the fleet view showing the upgrade")
    assert device["upgrade"]["previous"] == BASE
    actions = audit(box)
    for step in ("upgrade.download", "upgrade.install", "upgrade.switch", "upgrade.confirmed"):
        assert step in actions, f"{step} is audited"

    # and back down is refused unless the channel says so
    ok(shop.repo, "channel", "set", channel, "--appliance", BASE)
    sync_now(box)
    up = wait_for(lambda: (u := box.upgrade()) and u["state"] == "refused" and u, "the downgrade refused")
    assert "downgrade" in up["reason"] and "--allow-downgrade" in up["reason"]
    assert box.layout.target(box.layout.current) == GOOD


def _rolled_back(box: Box, version: str) -> dict[str, Any]:
    up: dict[str, Any] = wait_for(lambda: (s := box.running(BASE)) and s["upgrade"]["state"] == "rolled back"
                                  and s["upgrade"], f"{version} rolled back to {BASE}", timeout=240)
    assert up["desired"] == version and up["running"] == BASE
    assert box.layout.target(box.layout.current) == BASE
    return up


def test_a_release_that_crashes_at_start_is_taken_back_and_halts_the_canary_rollout(
        shop: Shop, channel: str, box: Box) -> None:
    ok(shop.repo, "devices", "add", f"{box.device}-peer", "--channel", channel)  # a box outside the rollout
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.1", "--percent", "100")
    sync_now(box)
    up = _rolled_back(box, "0.2.1")
    assert "did not confirm its health in 3 starts" in up["reason"] and "exited with code" in up["reason"]
    doc = json.loads(ok(shop.repo, "channel", "show", channel))
    halted = wait_for(lambda: (d := json.loads(ok(shop.repo, "channel", "show", channel)))["rollout"]["halted"] and d,
                      "the rollout halted by the canary's report")
    assert "appliance 0.2.1 rolled back" in halted["rollout"]["reason"]
    assert halted["appliance"] == BASE, "the rest of the channel stays on the old release"
    del doc
    sync_now(box)  # the halted rollout sends the box back to the channel's release: nothing to do
    wait_for(lambda: box.upgrade()["desired"] == BASE, "the box following the channel again")
    assert box.layout.target(box.layout.current) == BASE


@pytest.mark.parametrize("box", [{"confirm_within_s": 15.0}], indirect=True)
def test_a_release_that_never_becomes_healthy_or_cannot_reach_the_appstore_is_taken_back_with_what_it_recorded(
        shop: Shop, channel: str, box: Box) -> None:
    pub = Publisher(box.mqtt_port)
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.2")
    sync_now(box)
    try:
        # the failed release serves frames while it is on trial: its events must survive the rollback
        wait_for(lambda: (s := box.status()) and s["version"] == "0.2.2", "0.2.2 started")
        wait_for(lambda: (pub.publish("cameras/cam1/frame", render_frame(0.0, 0)),
                          (s := box.status()) and s["version"] == "0.2.2" and sum(s["events"].values()) > 0)[1],
                 "an event recorded by 0.2.2")
    finally:
        pub.close()
    with sqlite3.connect(f"file:{box.root / 'appliance.db'}?mode=ro", uri=True) as db:
        events = {r[0] for r in db.execute("SELECT id FROM events")}
    assert events
    up = _rolled_back(box, "0.2.2")
    assert "within 15 s" in up["reason"]
    with sqlite3.connect(f"file:{box.root / 'appliance.db'}?mode=ro", uri=True) as db:
        kept = {r[0] for r in db.execute("SELECT id FROM events")}
        schema = db.execute("PRAGMA user_version").fetchone()[0]
    assert events <= kept, "events written by the failed release are carried into the restored database"
    assert schema == SCHEMA_VERSION, "the database is at the schema the old release reads"
    assert "upgrade.switch" in audit(box) and "upgrade.rolled_back" in audit(box)

    # healthy in every other way, but it cannot phone home although the old release could
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.4")
    sync_now(box)
    wait_for(lambda: (s := box.status()) and s["version"] == "0.2.4", "0.2.4 started")
    up = _rolled_back(box, "0.2.4")
    assert "within 15 s" in up["reason"]
    assert [h["outcome"] for h in box.history()] == ["rolled back", "rolled back"]


def test_a_release_whose_migration_fails_is_tampered_with_or_signed_by_an_untrusted_key_is_refused_before_the_switch(
        shop: Shop, channel: str, box: Box, tmp_path: Path, models: dict[str, Path]) -> None:
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.3")
    sync_now(box)
    up = wait_for(lambda: (u := box.upgrade()) and u["state"] == "refused" and u, "0.2.3 refused")
    assert "self-test of 0.2.3 failed" in up["reason"] and "migration" in up["reason"]
    assert box.history() == [], "the launcher never switched"
    assert not box.layout.installed("0.2.3")
    report = wait_for(lambda: (d := shop.device(box.device)) and d["upgrade"] and d["upgrade"]["state"] == "refused"
                      and d["upgrade"]["desired"] == "0.2.3" and d, "the refusal reported")
    assert report["version"] == BASE

    manifest = json.loads((shop.releases["0.2.5"] / "release.json").read_text())
    own = next(f for f in manifest["files"] if f["name"].startswith("edge_appliance-"))
    served = shop.target_file(f"appliance/files/{own['sha256']}/{own['name']}")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.5")
    sync_now(box)
    up = wait_for(lambda: (u := box.upgrade()) and u["state"] == "refused" and u["desired"] == "0.2.5" and u,
                  "0.2.5 refused")
    assert "do not match their signed length or hashes" in up["reason"]
    assert not (box.layout.releases / "0.2.5").exists() and box.history() == []

    served = shop.target_file("appliance/0.2.6/release.json")
    manifest = json.loads(served.read_text())
    manifest["min_from"] = "0.0.1"  # a plausible edit, in a file the AppStore signed otherwise
    served.write_text(json.dumps(manifest))
    ok(shop.repo, "channel", "set", channel, "--appliance", "0.2.6")
    sync_now(box)
    up = wait_for(lambda: (u := box.upgrade()) and u["state"] == "refused" and u["desired"] == "0.2.6" and u,
                  "0.2.6 refused")
    assert "do not match their signed length or hashes" in up["reason"]
    assert not (box.layout.releases / "0.2.6").exists() and box.history() == []
    assert box.layout.target(box.layout.current) == BASE

    # an AppStore at the same address with keys of its own, offering the good release, byte for byte
    rogue = tmp_path / "rogue"
    ok(rogue, "keys", "init")
    ok(rogue, "publish", "release", str(shop.releases[GOOD]))
    ok(rogue, "publish", "model", str(models["demo-detector"]))
    ok(rogue, "publish", "app", str(write_app(tmp_path / "app.json")))
    ok(rogue, "channel", "set", channel, "--app", "ppe-watch=1.0.0", "--appliance", GOOD)
    genuine, shop.switch.app = shop.switch.app, build_app(rogue)
    manifest = ReleaseManifest.load(shop.releases[GOOD] / "release.json")
    try:
        sync_now(box)
        sync = wait_for(lambda: (s := box.status()) and "not signed by the keys this appliance trusts"
                        in s["appstore"]["last_error"] and s["appstore"], "the rogue AppStore refused")
        assert "check the AppStore address and the trusted root" in sync["last_error"]
        assert box.upgrade()["desired"] == "0.2.6", "the rogue channel was never read"
        assert not any(has_wheel(box.layout, f) for f in manifest.files if f.name.startswith("edge_appliance-"))
        assert not (box.layout.releases / GOOD).exists()
        assert any(a["name"] == "ppe-watch" and a["state"] == "serving" for a in box.status()["apps"]), \
            "the box keeps serving what it had"
    finally:
        shop.switch.app = genuine


@pytest.mark.parametrize("box", [{"crashpoints": True}], indirect=True)
def test_a_daemon_or_launcher_killed_at_every_step_of_an_upgrade_still_ends_on_a_working_release(
        shop: Shop, channel: str, box: Box) -> None:
    """SIGKILL (a kill, an OOM, a power cut) at each step, one after the other on one box: each start of the
    old release takes up where the killed one stopped, and the upgrade ends confirmed, with nothing lost."""
    own = ReleaseManifest.load(shop.releases[GOOD] / "release.json").appliance_wheel
    download = f"download.{own.sha256}.{own.name}"  # the file name of the wheel as the AppStore serves it
    box.arm(download, "upgrade.install", "upgrade.selftest", "upgrade.snapshot", "upgrade.switch", "launcher.switch",
            "upgrade.confirm")
    ok(shop.repo, "channel", "set", channel, "--appliance", GOOD)
    sync_now(box)
    # killed with part of the wheel on disk (the next start resumes the download), with a half-made release
    # (made again), in its self-test (tested again), with the snapshot taken but no request, and with the
    # request written but still running; after those the old release switches, and the launcher dies after
    # recording the trial, before the switch
    assert box.proc is not None
    box.proc.wait(240)
    assert box.proc.returncode == -signal.SIGKILL and box.armed() == ["upgrade.confirm"], box.log()[-3000:]
    assert "resuming" in box.log()
    assert box.layout.target(box.layout.current) == BASE
    box.start()
    # the new launcher finishes the switch; the new release is killed just before it confirms, and confirms
    # on its second start
    s = wait_until(lambda: (s := box.running(GOOD)) and s["upgrade"]["state"] == "upgraded" and s, 180,
                   interval=0.2, what="the box upgraded after every kill")
    wait_for(lambda: box.history(), "the launcher recording the confirmation")
    [entry] = box.history()
    assert entry["outcome"] == "confirmed" and "after 2 start(s)" in entry["reason"], entry
    assert box.armed() == []
    box.kill_launcher()  # after the confirmation: nothing to finish, the new release stays
    box.start()
    s = box.wait_running(GOOD)
    assert s["upgrade"]["state"] == "upgraded" and s["upgrade"]["previous"] == BASE
    assert [h["outcome"] for h in box.history()] == ["confirmed"]
    assert box.layout.installed(GOOD) and box.layout.target(box.layout.previous) == BASE
    actions = audit(box)
    assert actions.count("upgrade.switch") == 2, "each start that wrote its request audited the switch"
    assert "upgrade.confirmed" in actions


def _window_not_now() -> str:
    start = datetime.now() + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


@pytest.mark.parametrize("box", [{"window": _window_not_now()}], indirect=True)
def test_outside_its_window_a_release_waits_until_an_admin_applies_it_and_goes_back_on_an_admins_word(
        shop: Shop, channel: str, box: Box, browser: Browser) -> None:
    ok(shop.repo, "channel", "set", channel, "--appliance", GOOD)
    sync_now(box)
    up = wait_for(lambda: (u := box.upgrade()) and u["state"] == "waiting" and u, f"{GOOD} waiting for its window")
    assert up["window"] in up["reason"] and box.layout.installed(GOOD), "installed and tested, not switched"
    assert box.layout.target(box.layout.current) == BASE

    def cli(*args: str, input: str | None = None) -> str:
        r = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(box.config), *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, input=input)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("users", "add", "boss", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    page = new_page(browser, box)
    log_in(page, "boss", "/system")
    software = page.locator("#software")
    expect(software.locator("dt:has-text('Wanted by the AppStore') + dd")).to_have_text(GOOD)
    expect(software).to_contain_text(f"Switches only between {up['window']}")
    software.get_by_role("button", name="Postpone by a day").click()
    expect(page.locator("#software")).to_contain_text("Postponed until")
    sync_now(box)
    wait_for(lambda: box.upgrade()["state"] == "postponed", "the switch postponed")
    assert f"desired {GOOD}" in cli("upgrade") and "postponed until" in cli("upgrade")
    assert f"switching to {GOOD}" in cli("upgrade", "apply")
    wait_for(lambda: (s := box.running(GOOD)) and s["upgrade"]["state"] == "upgraded", f"{GOOD} applied by an admin",
             timeout=180)
    wait_for(lambda: box.history(), "the launcher recording the confirmation")  # it polls for it, after the daemon

    page.goto("/system")  # the new release's console; the session is in the database and outlives the switch
    software = page.locator("#software")
    expect(software.locator("dt:has-text('Running') + dd")).to_have_text(GOOD)
    expect(software.locator("table")).to_contain_text("Confirmed")
    page.once("dialog", lambda dialog: dialog.accept())
    software.get_by_role("button", name=f"Go back to {BASE}").click()
    s = wait_for(lambda: (s := box.running(BASE)) and s["upgrade"]["state"] == "rolled back" and s,
                 f"back on {BASE} on an admin's word", timeout=180)
    assert "rolled back by an admin" in s["upgrade"]["reason"] and box.layout.target(box.layout.current) == BASE
    sync_now(box)  # the channel still names GOOD: it is not tried again until the channel moves on
    wait_for(lambda: box.upgrade()["desired"] == GOOD, "the box reading its channel again")
    assert box.upgrade()["state"] == "rolled back" and box.layout.target(box.layout.current) == BASE
    with sqlite3.connect(f"file:{box.root / 'appliance.db'}?mode=ro", uri=True) as db:
        lines = {(a, b) for a, b in db.execute("SELECT actor, action FROM audit_log WHERE action LIKE 'upgrade.%'")}
    assert {("boss", "upgrade.postpone"), ("cli", "upgrade.apply"), ("boss", "upgrade.rollback")} <= lines
