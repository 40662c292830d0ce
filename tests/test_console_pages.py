"""The console's pages and forms over real HTTP and SQLite: login, roles on every page and form, CSRF,
audit, languages, empty states, error pages that say what to do, reporting a missed detection.

The live list and the look of the pages are tested in a real browser (test_console_browser.py); the
diagnostics bundle on the real daemon (test_console_e2e.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.console.i18n import translations
from appliance.demo.scene import render_frame
from appliance.status import DaemonStatus
from appliance.store import EventRecord, SpooledSample
from formats.sample import Prediction, SampleRecord
from tests.apiserver import ApiServer
from tests.test_api import USERS, populate

PAGES = ("/", "/alerts", "/alerts/e1", "/sources", "/apps", "/store", "/samples", "/system", "/users")
ADMIN_PAGES = {"/users"}
RANK = {"viewer": 0, "operator": 1, "admin": 2}


def status() -> DaemonStatus:
    """What the daemon reports, as the pages read it: one camera receiving, one sensor silent."""
    now = time.time()
    source = {"received": 10, "processed": 9, "skipped": 1, "fps_received": 4.5, "last_reject": None,
              "last_values": {}, "rejected": {}}
    return DaemonStatus.model_validate({
        "device": "ward-7", "version": "0.1.0", "uptime_s": 3600.0, "health": {"ok": True, "reason": ""},
        "broker": {"mode": "embedded", "host": "127.0.0.1", "port": 1883, "protocol": "3.1.1", "connected": True},
        "partitions": [{"name": "cpu", "device": "cpu", "kind": "cpu", "cores": [0, 1], "memory_mb": 4000,
                        "compute_percent": 100, "provider": "CPUExecutionProvider", "env": {},
                        "memory_used_mb": 120.0, "worker": "ready", "apps": ["ppe-watch"],
                        "utilisation_percent": 42.0, "utilisation_note": "of its cores", "error": ""}],
        "workers": [{"partition": "cpu", "state": "ready", "pid": 4242, "threads": 2, "executors": 1, "restarts": 0,
                     "last_restart_reason": "", "inflight": 0}],
        "models": [{"key": "demo-detector@1.0.0", "state": "ready", "reason": "", "partition": "cpu",
                    "providers": ["CPUExecutionProvider"], "memory_mb": 20.0}],
        "apps": [{"name": "ppe-watch", "version": "1.0.0", "model": "demo-detector@1.0.0", "partition": "cpu",
                  "sources": ["cameras/+/frame"], "state": "serving", "reason": "", "swap": "", "events": 3}],
        "sources": [
            {**source, "id": "cam1", "kind": "camera", "state": "receiving", "reason": "", "fps_processed": 4.0,
             "fps_skipped": 0.5, "last_seen": now},
            {**source, "id": "gas1", "kind": "sensor", "state": "silent", "reason": "no data for more than 30 s",
             "fps_processed": 0.0, "fps_skipped": 0.0, "last_seen": now - 100},
        ],
        "unknown_sources": {"rejected": {}, "recent": []},
        "samples": {"by_reason": {"near_threshold": {"queued": 3, "uploaded": 7, "queued_bytes": 120000}},
                    "dropped": {"random": 2}, "quota": {"bytes": 512 * 2**20, "count": 5000}, "skipped_busy": 0,
                    "uploader": {"state": "retrying", "policy": "full", "redact": ["person"], "uploaded": 7,
                                 "refused": 0, "last_refusal": "", "next_try_s": 4.0,
                                 "last_error": "the AppStore cannot be reached", "last_upload": None}},
        "appstore": {"state": "refused", "url": "http://store.test/", "channel": "stable", "group": "canary",
                     "rollout": "r8", "last_sync": now - 30, "last_error": "gas-watch: refused at install: too big",
                     "desired": {"ppe-watch": "1.1.0", "gas-watch": "2.0.0"},
                     "refused": {"gas-watch": "refused at install: too big"}, "downloads": [],
                     "catalog": [
                         {"name": "ppe-watch", "versions": ["1.0.0", "1.1.0"], "latest": "1.1.0",
                          "description": "Helmets and vests", "model": "demo-detector@1.0.0"},
                         {"name": "fall-watch", "versions": ["0.9.0"], "latest": "0.9.0",
                          "description": "Patients who fall", "model": "demo-detector@1.0.0"}]},
    })


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("pages") / "state", status=status)
    populate(server, models, server.state_dir.parent)
    server.stats.frame("cam1", render_frame(0.0, 0), time.time())
    for i in range(5):
        server.stats.values("gas1", {"ch4": 0.4 + i / 10, "temp": 21.0}, time.time() - 10 + i)
    yield server
    server.stop()


class Page:
    """A browser-like client: logged in through the login form, posting forms with the page's CSRF token."""

    def __init__(self, api: ApiServer, name: str) -> None:
        self.client = api.client()
        r = self.client.post("/login", data={"user": name, "password": api.passwords[name], "next": "/"})
        assert r.status_code == 303, r.text
        self.csrf = csrf_of(self.client.get("/").text)

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)

    def post(self, path: str, **data: str) -> httpx.Response:
        return self.client.post(path, data={"csrf_token": self.csrf, **data})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page carries the session's CSRF token in its forms"
    return found.group(1)


def h1(html: str) -> str:
    found = re.search(r"<h1>(.*?)</h1>", html, re.DOTALL)
    return found.group(1).strip() if found else ""


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    made: list[ApiServer] = []

    def make(**kwargs: Any) -> ApiServer:
        made.append(ApiServer(tmp_path / f"state{len(made)}", **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture(scope="module")
def pages(api: ApiServer) -> dict[str, Page]:
    return {role: Page(api, name) for role, name in USERS.items()}


@pytest.mark.parametrize("path", PAGES)
def test_a_page_without_login_goes_to_the_login_form_and_back(api: ApiServer, path: str) -> None:
    c = api.client()
    r = c.get(path)
    assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}"
    login = c.get(r.headers["location"])
    assert login.status_code == 200 and f'name="next" value="{path}"' in login.text
    r = c.post("/login", data={"user": "viewer1", "password": api.passwords["viewer1"], "next": path})
    assert r.status_code == 303 and r.headers["location"] == path


@pytest.mark.parametrize("role", list(RANK))
@pytest.mark.parametrize("path", PAGES)
def test_pages_by_role(pages: dict[str, Page], path: str, role: str) -> None:
    r = pages[role].get(path)
    if path in ADMIN_PAGES and role != "admin":
        assert r.status_code == 403
        assert "Ask an admin" in r.text and f"{USERS[role]} is {role}" in r.text
    else:
        assert r.status_code == 200 and h1(r.text), r.text[:500]
        assert "Log out" in r.text and USERS[role] in r.text


def test_the_menu_shows_users_to_admins_only(pages: dict[str, Page]) -> None:
    assert 'href="/users"' in pages["admin"].get("/").text
    assert 'href="/users"' not in pages["operator"].get("/").text


def test_the_way_back_after_login_keeps_the_filters(api: ApiServer) -> None:
    c = api.client()
    r = c.get("/alerts", params={"source": "cam2", "period": "24h"})
    assert r.headers["location"] == "/login?next=/alerts%3Fsource%3Dcam2%26period%3D24h"
    assert 'name="next" value="/alerts?source=cam2&amp;period=24h"' in c.get(r.headers["location"]).text
    r = c.post("/login", data={"user": "viewer1", "password": api.passwords["viewer1"],
                               "next": "/alerts?source=cam2&period=24h"})
    assert r.headers["location"] == "/alerts?source=cam2&period=24h"


def test_login_refuses_a_link_to_another_site(api: ApiServer) -> None:
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        c = api.client()
        assert 'name="next" value="/"' in c.get("/login", params={"next": evil}).text
        r = c.post("/login", data={"user": "viewer1", "password": api.passwords["viewer1"], "next": evil})
        assert r.status_code == 303 and r.headers["location"] == "/"
        r = c.get("/login", params={"next": evil})
        assert r.status_code == 303 and r.headers["location"] == "/", "logged in: straight on, but not away"


def test_a_wrong_password_says_so_on_the_form(api: ApiServer) -> None:
    r = api.client().post("/login", data={"user": "viewer1", "password": "not the password at all"})
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    assert "appliance_session" not in r.headers.get("set-cookie", "")


def test_no_users_yet_says_how_to_make_the_first_admin(fresh: Callable[..., ApiServer]) -> None:
    r = fresh().client().post("/login", data={"user": "admin", "password": "admin"})
    assert r.status_code == 401 and "appliance users add NAME --role admin" in r.text


def test_forms_need_the_csrf_token(api: ApiServer, pages: dict[str, Page]) -> None:
    operator = pages["operator"]
    r = operator.client.post("/alerts/e2/handle", data={"action": "acknowledged"})
    assert r.status_code == 403 and "security token" in r.text and "reload the page" in r.text
    r = operator.client.post("/alerts/e2/handle", data={"action": "acknowledged", "csrf_token": "forged"})
    assert r.status_code == 403
    assert api.store.handling.for_events(["e2"]) == {}, "nothing was stored"


def test_a_viewer_cannot_handle_an_alert(api: ApiServer, pages: dict[str, Page]) -> None:
    page = pages["viewer"].get("/alerts/e2").text
    assert 'value="acknowledged"' not in page and "an operator handles them" in page
    r = pages["viewer"].post("/alerts/e2/handle", action="acknowledged")
    assert r.status_code == 403 and "needs the operator role" in r.text
    assert api.store.handling.for_events(["e2"]) == {}


def test_an_operator_handles_an_alert_and_it_is_audited(api: ApiServer, pages: dict[str, Page]) -> None:
    r = pages["operator"].post("/alerts/e3/handle", action="false_positive", note="a coat on a hook")
    assert r.status_code == 303 and r.headers["location"] == "/alerts/e3?done=false_positive"
    page = pages["operator"].get(r.headers["location"]).text
    assert "Marked as a false positive" in page and "a coat on a hook" in page and "operator1" in page
    [record] = api.store.handling.for_events(["e3"])["e3"]
    assert (record.action, record.user, record.note) == ("false_positive", "operator1", "a coat on a hook")
    audit = [a for a in api.store.audit_log.recent(50) if a.action == "event.handle"]
    assert audit[0].actor == "operator1" and audit[0].address == "127.0.0.1" and audit[0].detail["event"] == "e3"
    r = pages["operator"].post("/alerts/e3/handle", action="note", note="   ")
    assert r.headers["location"].endswith("done=empty_note") and len(api.store.handling.for_events(["e3"])["e3"]) == 1


def test_alert_filters(pages: dict[str, Page]) -> None:
    page = pages["viewer"].get("/alerts?source=cam2").text
    assert 'id="alert-e3"' in page and 'id="alert-e1"' not in page and 'id="alert-e2"' not in page
    assert "No alerts match these filters" in pages["viewer"].get("/alerts?label=nothing-like-this").text
    page = pages["viewer"].get("/alerts?period=1h").text
    assert 'id="alert-e1"' not in page, "the stored events are from 1970: not in the last hour"


def test_an_operator_reports_a_missed_detection_on_a_camera_frame(api: ApiServer, pages: dict[str, Page]) -> None:
    assert 'action="/sources/cam1/missed"' not in pages["viewer"].get("/sources").text
    assert pages["viewer"].post("/sources/cam1/missed", label="x").status_code == 403
    frame = pages["viewer"].get("/sources/cam1/frame.jpg")
    assert frame.status_code == 200 and frame.content[:2] == b"\xff\xd8"

    r = pages["operator"].post("/sources/cam1/missed", label="person without helmet", note="left edge")
    assert r.status_code == 303
    event_id = r.headers["location"].split("/")[2].split("?")[0]
    event = api.store.events.get(event_id)
    assert event is not None and (event.source, event.label) == ("cam1", "person without helmet")
    [record] = api.store.handling.for_events([event_id])[event_id]
    assert (record.action, record.user, record.note) == ("missed_detection", "operator1", "left edge")
    snapshot = pages["viewer"].get(f"/api/v1/events/{event_id}/snapshot")
    assert snapshot.status_code == 200 and snapshot.content[:2] == b"\xff\xd8", "the frame is kept"
    assert any(a.action == "event.report_missed" and a.actor == "operator1" for a in api.store.audit_log.recent(20))
    r = pages["operator"].post("/sources/cam9/missed", label="x")
    assert r.status_code == 404 and "no frame from camera cam9" in r.text


def test_sources_show_state_frames_and_trends(pages: dict[str, Page]) -> None:
    page = pages["viewer"].get("/sources").text
    assert 'src="/sources/cam1/frame.jpg' in page
    assert "no data for more than 30 s" in page, "a silent sensor says why"
    assert page.count("<polyline") == 2, "a trend per channel (ch4, temp)"


def test_only_admins_change_apps_and_users(api: ApiServer, pages: dict[str, Page]) -> None:
    assert pages["operator"].post("/apps/ppe-watch/disable").status_code == 403
    assert pages["operator"].post("/users", name="mallory", role="admin", password="x" * 12).status_code == 403
    assert api.store.users.get("mallory") is None
    admin = pages["admin"]
    assert 'action="/apps/ppe-watch/rollback"' in admin.get("/apps").text
    r = admin.post("/apps/ppe-watch/disable")
    assert r.status_code == 303 and "App disabled" in admin.get(r.headers["location"]).text
    app = api.store.apps.get("ppe-watch")
    assert app is not None and not app.enabled
    admin.post("/apps/ppe-watch/enable")
    r = admin.post("/users", name="nurse2", role="viewer", password="ward eight days", lang="zh")
    assert r.status_code == 303
    user = api.store.users.get("nurse2")
    assert user is not None and (user.role, user.language) == ("viewer", "zh")
    r = admin.post("/users", name="nurse3", role="viewer", password="short")
    assert r.status_code == 422 and "at least 10 characters" in r.text and "Go back" in r.text
    admin.post("/users/nurse2/update", role="operator")
    admin.post("/users/nurse2/remove")
    assert api.store.users.get("nurse2") is None
    actions = [a.action for a in api.store.audit_log.recent(20) if a.actor == "admin1"]
    assert {"app.disable", "app.enable", "user.add", "user.update", "user.remove"} <= set(actions)


def test_the_store_shows_the_catalog_updates_and_refusals(api: ApiServer, pages: dict[str, Page]) -> None:
    page = pages["viewer"].get("/store").text
    assert "Helmets and vests" in page and "Update available" in page, "1.1.0 is published, 1.0.0 installed"
    assert "Channel stable: version 1.1.0" in page and "in rollout r8" in page
    assert "refused at install: too big" in page and "Update refused" in page
    assert 'action="/store/fall-watch/subscribe"' not in page, "viewers do not subscribe"
    admin = pages["admin"]
    assert 'action="/store/fall-watch/subscribe"' in admin.get("/store").text
    assert 'action="/store/ppe-watch/subscribe"' not in admin.get("/store").text, "the channel decides that one"
    assert pages["operator"].post("/store/fall-watch/subscribe").status_code == 403
    r = admin.post("/store/fall-watch/subscribe")
    assert r.status_code == 303 and api.store.subscriptions.all() == ["fall-watch"]
    assert "Subscribed here" in admin.get("/store").text
    admin.post("/store/fall-watch/unsubscribe")
    assert api.store.subscriptions.all() == []
    assert [a.action for a in api.store.audit_log.recent(5) if a.actor == "admin1"][:2] == ["app.unsubscribe",
                                                                                            "app.subscribe"]
    system = pages["viewer"].get("/system").text
    assert "http://store.test/" in system and "group canary" in system


def test_the_samples_page_shows_counts_drops_and_the_privacy_policy(pages: dict[str, Page]) -> None:
    page = pages["viewer"].get("/samples").text
    assert "Close to the threshold" in page and "Blurred before upload: person" in page
    assert "the AppStore cannot be reached" in page and "Retrying" in page
    assert "Dropped (spool full)" in page


def test_without_an_appstore_the_store_page_says_how_to_set_one_up(fresh: Callable[..., ApiServer]) -> None:
    server = fresh()
    server.add_user("boss", "admin")
    assert "appstore.url and appstore.root" in Page(server, "boss").get("/store").text


def test_language_is_the_users_own_and_switchable_on_every_page(api: ApiServer) -> None:
    zh = translations("zh").gettext
    page = Page(api, "viewer1")
    try:
        r = page.post("/language", lang="zh", next="/sources")
        assert r.status_code == 303 and r.headers["location"] == "/sources"
        html = page.get("/sources").text
        assert '<html lang="zh-Hans">' in html and f"<h1>{zh('Sources')}</h1>" in html
        user = api.store.users.get("viewer1")
        assert user is not None and user.language == "zh", "kept for the user, on any browser"
        again = Page(api, "viewer1")
        assert '<html lang="zh-Hans">' in again.get("/").text
        assert page.post("/language", lang="klingon").status_code == 404
    finally:
        page.post("/language", lang="en")
    assert '<html lang="en">' in page.get("/").text


def test_the_login_page_follows_the_browser_then_the_choice(api: ApiServer) -> None:
    c = api.client()
    assert '<html lang="zh-Hans">' in c.get("/login", headers={"accept-language": "zh-CN,zh;q=0.9"}).text
    assert '<html lang="en">' in c.get("/login", headers={"accept-language": "de-DE"}).text
    r = c.post("/language", data={"lang": "zh", "next": "/login"})
    assert r.status_code == 303
    assert '<html lang="zh-Hans">' in c.get("/login", headers={"accept-language": "en"}).text


def test_dates_and_numbers_follow_the_language(api: ApiServer) -> None:
    api.store.events.add(EventRecord("e-big", 1_700_000_000.0, "ppe-watch", "cam1", "person-seen", "person", 0.5))
    page = Page(api, "admin1")
    try:
        en = page.get("/alerts/e-big").text
        page.post("/language", lang="zh")
        zh = page.get("/alerts/e-big").text
    finally:
        page.post("/language", lang="en")
    assert "2023" in en and "Nov" in en, "an English date"
    assert "2023年11月" in zh, "a Chinese date"


def test_empty_states_say_what_to_do(fresh: Callable[..., ApiServer]) -> None:
    server = fresh()
    server.add_user("boss", "admin")
    page = Page(server, "boss")
    assert "No cameras or sensors yet: publish frames to cameras/&lt;name&gt;/frame" in page.get("/").text
    assert "No alerts yet" in page.get("/alerts").text
    assert "appliance apps add" in page.get("/apps").text


def test_unknown_pages_and_alerts_say_where_to_go(pages: dict[str, Page]) -> None:
    r = pages["viewer"].get("/no-such-page")
    assert r.status_code == 404 and "There is no page at /no-such-page" in r.text and "menu" in r.text
    r = pages["viewer"].get("/alerts/nope")
    assert r.status_code == 404 and "retention may have removed it" in r.text
    assert pages["viewer"].client.get("/api/v1/nope").json()["error"].startswith("no such endpoint"), \
        "the API keeps answering JSON"


def test_logout_ends_the_session(api: ApiServer) -> None:
    page = Page(api, "viewer1")
    stale = api.client()
    stale.cookies.update(page.client.cookies)
    r = page.post("/logout")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert page.get("/").headers["location"] == "/login?next=/"
    r = stale.get("/alerts")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/alerts&ended=1", "the old cookie is dead"
    assert "Your session has ended" in stale.get(r.headers["location"]).text


def test_pages_are_not_cached_and_assets_are_served_locally(pages: dict[str, Page]) -> None:
    r = pages["viewer"].get("/")
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', r.text):
        assert pages["viewer"].get(asset).status_code == 200
    assert "http://" not in r.text and "https://" not in r.text, "nothing from the internet"


def test_the_samples_page_says_which_samples_the_appstore_refused_and_why(fresh: Callable[..., ApiServer]) -> None:
    why = "meta: predictions.0.box: Input should be a valid array"

    def refusing() -> DaemonStatus:
        raw = status().model_dump(mode="json")
        raw["samples"]["by_reason"] = {"missed_detection": {"queued": 0, "uploaded": 4, "refused": 1,
                                                            "queued_bytes": 0}}
        raw["samples"]["uploader"] |= {"state": "idle", "refused": 1, "last_refusal": why, "last_error": ""}
        return DaemonStatus.model_validate(raw)

    server = fresh(status=refusing)
    server.add_user("nurse", "viewer")
    record = SampleRecord(id="a" * 32, device="test", ts=time.time(), reason="missed_detection", app="(reported)",
                          source="cam1", predictions=[Prediction(label="person without helmet", score=0.0)])
    server.store.samples.add(SpooledSample(record.id, record.ts, record.app, "cam1", "missed_detection", 3, 10,
                                           record.to_json()), 2**30, 100)
    server.store.samples.mark_refused("a" * 32, why)
    page = Page(server, "nurse").get("/samples").text
    assert "Refused by the AppStore since start: 1" in page and "not sent again" in page and why in page
    assert page.count("Refused by the AppStore") >= 3, "the column, the count, and the sample's own card"
    zh = translations("zh").gettext
    assert zh("Refused by the AppStore") != "Refused by the AppStore", "translated"
