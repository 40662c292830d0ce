"""The console in a real browser (Debian's Chromium driven by playwright, no browser download) against the real
daemon: an alert arriving live and handled, the language switch, what a viewer and an operator may not do, and
screenshots of every page in both languages (into screenshots/, git-ignored) for people to look at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, ViewportSize, expect

from appliance.console.i18n import translations
from appliance.demo.run import DETECTOR_APP, GAS_APP
from appliance.demo.scene import render_frame
from appliance.demo.simulators import CameraSimulator, GasSensorSimulator
from appliance.settings import BrokerSettings
from tests.conftest import CHROMIUM, ROOT, Daemon, DaemonFactory, Publisher, new_daemon, wait_until, write_app

if not CHROMIUM.exists():
    # never a skipped browser suite: `make test` installs Chromium (tools/system-packages); a bare pytest run
    # without it fails here and says how to get it
    raise RuntimeError("Chromium is not installed: run `make test` (it installs it) or `tools/system-packages test`; "
                       "these tests drive the system's Chromium and never download a browser")

pytestmark = pytest.mark.slow

WAIT_MS = 30_000  # the machine may be busy (benchmarks): be patient, never sleep
WAIT_S = WAIT_MS / 1000
PASSWORD = "correct horse battery staple"
USERS = {"boss": "admin", "shift-lead": "operator", "lin": "operator", "nurse": "viewer"}
SCREENSHOTS = ROOT / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
TABLET: ViewportSize = {"width": 800, "height": 1100}
HTML_LANG = {"en": "en", "zh": "zh-Hans"}
PAGE_NAMES = {"/": "overview", "/alerts": "alerts", "/sources": "sources", "/apps": "apps", "/system": "system",
              "/users": "users"}  # the menu's pages named as the screenshots are; a page added to it is shot too

expect.set_options(timeout=WAIT_MS)


# ---------------------------------------------------------------- helpers

def add_users(d: Daemon, users: dict[str, str]) -> None:
    for name, role in users.items():
        d.cli("users", "add", name, "--role", role, "--password-stdin", input=PASSWORD + "\n")


def api_login(d: Daemon, user: str) -> httpx.Client:
    r = httpx.post(f"{d.base_url}/api/v1/login", json={"user": user, "password": PASSWORD}, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    return httpx.Client(base_url=d.base_url, cookies=r.cookies, timeout=WAIT_S,
                        headers={"X-CSRF-Token": r.json()["csrf_token"]})


def wait_serving(d: Daemon, *apps: str) -> None:
    wait_until(lambda: all({a["name"]: a["state"] for a in d.status()["apps"]}.get(app) == "serving" for app in apps),
               WAIT_S * 2, what=f"apps {apps} serving")


class Served(Protocol):
    """A console to point a browser at: a test daemon, or a box under the launcher (test_upgrade.py)."""

    @property
    def base_url(self) -> str: ...


def new_page(browser: Browser, d: Served, viewport: ViewportSize = DESKTOP) -> Page:
    """A page in a browser of its own (no cookies), whose Accept-Language is English."""
    context = browser.new_context(base_url=d.base_url, viewport=viewport, locale="en-GB")
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    return context.new_page()


def log_in(page: Page, user: str, next_page: str = "/") -> None:
    """Log in through the login form, as a person does, and land on ``next_page``."""
    page.goto(f"/login?next={next_page}")
    page.locator("input[name=user]").fill(user)
    page.locator("input[name=password]").fill(PASSWORD)
    page.locator("form[action='/login'] button[type=submit]").click()
    expect(page).to_have_url(re.compile(re.escape(next_page) + "$"))
    expect(page.locator("header form.who")).to_contain_text(user)


def log_out(page: Page) -> None:
    page.locator("header form.who button").click()
    expect(page).to_have_url(re.compile(r"/login$"))


def choose_language(page: Page, lang: str) -> None:
    page.locator(f"header form.lang button[value={lang}]").click()
    expect(page.locator("html")).to_have_attribute("lang", HTML_LANG[lang])


def row(page: Page, event_id: str) -> Locator:
    return page.locator(f'li.alert-row[id="alert-{event_id}"]')


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[Daemon]:
    """A quiet daemon: an app whose rule fires on every frame with a person, no camera sending until a test does."""
    folder = tmp_path_factory.mktemp("browser")
    d = new_daemon(folder)
    d.cli("models", "add", str(models["demo-detector"]))
    rule = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "debounce": {"n": 1, "m": 1},
            "cooldown_s": 0}
    d.cli("apps", "add", str(write_app(folder / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [rule])))
    add_users(d, USERS)
    try:
        d.start()
        wait_serving(d, "ppe-watch")
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[httpx.Client]:
    client = api_login(daemon, "boss")
    yield client
    client.close()


def publish_frame(d: Daemon, camera: str) -> None:
    pub = Publisher(d.mqtt_port)
    try:
        pub.publish(f"cameras/{camera}/frame", render_frame(0.0, 0))
    finally:
        pub.close()


# ---------------------------------------------------------------- tests

def test_an_alert_arrives_live_and_an_operator_marks_it_false_positive(daemon: Daemon, browser: Browser,
                                                                       admin: httpx.Client) -> None:
    page = new_page(browser, daemon)
    log_in(page, "shift-lead", "/alerts")
    expect(page.locator("h1")).to_have_text("Alerts")
    expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    expect(page.locator("#live-state")).to_have_text("Live: new alerts appear at the top.")
    rows = page.locator("#alert-list > li.alert-row")
    before = rows.count()
    page.evaluate("window.sameDocument = true")

    publish_frame(daemon, "cam1")

    expect(rows).to_have_count(before + 1)
    top = rows.first
    expect(top).to_have_class(re.compile(r"\barrived\b"))
    expect(top).to_have_attribute("data-source", "cam1")
    expect(top.locator(".title")).to_have_text("person")
    expect(top.locator(".handled .pill.open")).to_have_text("Not handled yet")
    expect(page.locator("#alerts-empty")).to_be_hidden()
    assert page.evaluate("window.sameDocument === true"), "the row came without reloading the page"
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=top.locator(".thumb img").element_handle(), timeout=WAIT_MS)
    event_id = (top.get_attribute("id") or "").removeprefix("alert-")
    assert event_id

    top.get_by_role("button", name="False positive").click()
    expect(page).to_have_url(re.compile(r"/alerts\?done=false_positive$"))
    expect(page.locator(".flash")).to_contain_text("Marked as a false positive")
    handled = row(page, event_id)
    expect(handled.locator(".handled .pill.false_positive")).to_have_text("False positive")
    expect(handled.locator(".handled")).to_contain_text("by shift-lead")
    expect(handled).not_to_have_class(re.compile(r"\bnew\b"))
    expect(handled.get_by_role("button")).to_have_count(0)  # nothing left to do on it

    mine = page.request.get(f"/api/v1/events/{event_id}")  # the operator's own session
    assert mine.ok
    stored = admin.get(f"/api/v1/events/{event_id}").json()["handling"]  # an admin, through the API
    assert mine.json()["handling"] == stored
    assert [(h["action"], h["user"]) for h in stored] == [("false_positive", "shift-lead")]
    page.context.close()


def test_switching_to_chinese_and_back_is_kept_for_the_user(daemon: Daemon, browser: Browser) -> None:
    zh = translations("zh").gettext
    page = new_page(browser, daemon)
    log_in(page, "lin", "/alerts")
    html, nav_alerts = page.locator("html"), page.locator('header nav a[href="/alerts"]')
    expect(html).to_have_attribute("lang", "en")
    expect(nav_alerts).to_have_text("Alerts")

    choose_language(page, "zh")
    expect(page).to_have_url(re.compile(r"/alerts$"))  # still on the same page
    expect(nav_alerts).to_have_text(zh("Alerts"))
    expect(page.locator("h1")).to_have_text(zh("Alerts"))
    expect(page.locator("header form.lang button[value=zh]")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("header form.lang button[value=en]")).to_have_attribute("aria-pressed", "false")
    listed = daemon.cli("users", "list").stdout
    assert re.search(r"^lin\s+operator\s+zh\s", listed, re.MULTILINE), listed

    log_out(page)
    expect(html).to_have_attribute("lang", "zh-Hans")  # the login page keeps the choice too
    elsewhere = new_page(browser, daemon)  # another browser: no cookie, asks for English
    log_in(elsewhere, "lin")
    expect(elsewhere.locator("html")).to_have_attribute("lang", "zh-Hans")
    expect(elsewhere.locator('header nav a[href="/"]')).to_have_text(zh("Overview"))
    expect(elsewhere.locator('header nav a[href="/"]')).to_have_attribute("aria-current", "page")

    choose_language(elsewhere, "en")
    expect(elsewhere.locator('header nav a[href="/alerts"]')).to_have_text("Alerts")
    log_in(page, "lin", "/alerts")
    expect(html).to_have_attribute("lang", "en")
    expect(nav_alerts).to_have_text("Alerts")
    assert re.search(r"^lin\s+operator\s+en\s", daemon.cli("users", "list").stdout, re.MULTILINE)
    page.context.close()
    elsewhere.context.close()


def test_a_viewer_cannot_handle_alerts_nor_an_operator_manage_users(daemon: Daemon, browser: Browser,
                                                                    admin: httpx.Client) -> None:
    publish_frame(daemon, "cam2")
    events = wait_until(lambda: admin.get("/api/v1/events", params={"source": "cam2"}).json(), WAIT_S,
                        what="an alert from cam2")
    event_id = events[0]["id"]

    page = new_page(browser, daemon)
    log_in(page, "nurse", f"/alerts/{event_id}")
    expect(page.locator("h1")).to_contain_text("person")
    expect(page.locator("img.snapshot")).to_be_visible()
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    expect(page.locator("form.handle")).to_have_count(0)
    expect(page.get_by_text("Viewers can see alerts; an operator handles them.")).to_be_visible()
    page.goto("/alerts")
    expect(row(page, event_id)).to_be_visible()
    expect(row(page, event_id).get_by_role("button")).to_have_count(0)

    page.goto(f"/alerts/{event_id}")
    csrf = page.locator("header form.lang input[name=csrf_token]").input_value()
    assert csrf
    forged = page.request.post(f"/alerts/{event_id}/handle", max_redirects=0,
                               form={"csrf_token": csrf, "action": "acknowledged", "note": "forged"})
    assert forged.status == 403 and "Not allowed" in forged.text() and "operator" in forged.text()
    allowed = page.request.post("/language", form={"csrf_token": csrf, "lang": "en", "next": "/"}, max_redirects=0)
    assert allowed.status == 303, "the token itself is good: the role is what refused the handling"
    assert admin.get(f"/api/v1/events/{event_id}").json()["handling"] == [], "nothing was stored"
    assert not [a for a in admin.get("/api/v1/audit").json() if a["action"] == "event.handle" and a["actor"] == "nurse"]
    page.context.close()

    page = new_page(browser, daemon)
    log_in(page, "shift-lead")
    expect(page.locator('header nav a[href="/users"]')).to_have_count(0)
    response = page.goto("/users")
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_have_text("Not allowed")
    expect(page.locator(".error-page .message")).to_contain_text("admin")
    expect(page.locator(".error-page .hint")).to_contain_text("Ask an admin")
    page.context.close()


def test_an_error_page_keeps_the_menu_and_a_working_language_switch(daemon: Daemon, browser: Browser) -> None:
    page = new_page(browser, daemon)
    log_in(page, "boss")
    response = page.goto("/alerts/no-such-alert")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    try:
        expect(page.locator('header nav a[href="/alerts"]')).to_be_visible(timeout=2000)
        page.locator("header form.lang button[value=en]").click()
        expect(page.locator("h1")).to_have_text("Not found", timeout=5000)  # not "Not allowed"
    finally:
        page.context.close()


# ---------------------------------------------------------------- screenshots

SETTLE_JS = """async () => {
  const images = [...document.images];
  images.forEach((img) => { img.loading = "eager"; });
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  await document.fonts.ready;
  return images.filter((img) => !img.naturalWidth).map((img) => img.src);
}"""


def shoot(page: Page, path: str, name: str, status: int = 200) -> None:
    """Open ``path``, check that it loaded (status, its <h1>, every picture, nothing wider than the window), and
    save a full-page PNG."""
    response = page.goto(path)
    assert response is not None and response.status == status, f"{path}: {response and response.status}"
    expect(page.locator("main h1").first).to_be_visible()
    if page.locator("#live-state").count():
        expect(page.locator("#live-state")).to_have_attribute("data-state", "open")
    broken = page.evaluate(SETTLE_JS)
    assert broken == [], f"{path}: pictures that did not load: {broken}"
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{path} ({name}) scrolls sideways by {overflow} px"
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True, animations="disabled")


def test_screenshots_of_every_page_in_both_languages(make_daemon: DaemonFactory, models: dict[str, Path],
                                                     tmp_path: Path, browser: Browser) -> None:
    """The demo (two cameras, a gas sensor, both demo apps) for a few seconds, then every page, for people to look at."""
    d = make_daemon(start=False)
    for model in ("demo-detector", "demo-gas-anomaly"):
        d.cli("models", "add", str(models[model]))
    for manifest in (DETECTOR_APP, GAS_APP):
        manifest_file = tmp_path / f"{manifest['name']}.json"
        manifest_file.write_text(json.dumps(manifest))
        d.cli("apps", "add", str(manifest_file))
    add_users(d, {"admin": "admin", "shift-lead": "operator", "nurse": "viewer"})
    d.start()
    wait_serving(d, "ppe-watch", "gas-watch")

    broker = BrokerSettings(port=d.mqtt_port)
    simulators = [CameraSimulator(broker, "cam1", 0, fps=3), CameraSimulator(broker, "cam2", 1, fps=3),
                  GasSensorSimulator(broker, "gas1", hz=2)]
    for sim in simulators:
        sim.start()
    try:
        admin = api_login(d, "admin")
        admin.post("/api/v1/tokens", json={"name": "vms", "user": "shift-lead"}).raise_for_status()

        def demo_ready() -> list[dict[str, Any]] | None:
            events = admin.get("/api/v1/events").json()
            sources = {s["id"]: s["state"] for s in d.status()["sources"]}
            ok = ({e["source"] for e in events} >= {"cam1", "cam2", "gas1"}
                  and sources == {"cam1": "receiving", "cam2": "receiving", "gas1": "receiving"})
            return events if ok else None

        events = wait_until(demo_ready, WAIT_S, interval=0.2, what="alerts from both cameras and the gas sensor")
        people = [e for e in events if e["label"] == "person"]
        admin.post(f"/api/v1/events/{people[-1]['id']}/handling",
                   json={"action": "acknowledged", "note": "Checked on camera: helmet on."}).raise_for_status()
        admin.post(f"/api/v1/events/{people[0]['id']}/handling", json={"action": "false_positive"}).raise_for_status()
        SCREENSHOTS.mkdir(exist_ok=True)
        for old in SCREENSHOTS.glob("*.png"):  # only this run's pictures, none of a page that is gone
            old.unlink()

        desktop, tablet = new_page(browser, d), new_page(browser, d, TABLET)
        log_in(desktop, "admin")
        log_in(tablet, "admin")
        menu: list[str] = desktop.locator("header nav a").evaluate_all("links => links.map((a) => a.pathname)")
        assert set(PAGE_NAMES) <= set(menu), menu
        pages = {PAGE_NAMES.get(href) or href.strip("/").replace("/", "-"): href for href in menu}
        pages |= {"alert": f"/alerts/{people[-1]['id']}", "error": "/alerts/no-such-alert"}
        for lang in ("en", "zh"):
            desktop.goto("/")
            choose_language(desktop, lang)
            for name, path in pages.items():
                shoot(desktop, path, f"{name}-{lang}", 404 if name == "error" else 200)
            for name in ("overview", "alerts"):
                shoot(tablet, pages[name], f"{name}-{lang}-tablet")
                # the same user in another browser: the language is the user's, so the tablet has it too
                expect(tablet.locator("html")).to_have_attribute("lang", HTML_LANG[lang])

        logged_out = new_page(browser, d)
        for lang in ("en", "zh"):
            logged_out.goto("/login")
            choose_language(logged_out, lang)
            shoot(logged_out, "/login", f"login-{lang}")
        for page in (desktop, tablet, logged_out):
            page.context.close()
    finally:
        for sim in simulators:
            sim.stop()
    wanted = {f"{name}-{lang}{size}.png" for lang in ("en", "zh") for name, size in
              [*((n, "") for n in [*pages, "login"]), ("overview", "-tablet"), ("alerts", "-tablet")]}
    assert wanted <= {p.name for p in SCREENSHOTS.glob("*.png")}
