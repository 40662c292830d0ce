"""The REST API over a real loopback server and a real store: every route for every role, CSRF, tokens,
rate limits, the audit log, and secrets kept out of logs."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from PIL import Image

from appliance import packages
from appliance.auth import LoginLimits
from appliance.http.api import router as api_router
from appliance.http.security import CSRF_HEADER, SESSION_COOKIE, is_loopback
from appliance.status import DaemonStatus
from appliance.store import EventRecord
from tests.apiserver import LOCAL, ApiServer, fake_status
from tests.conftest import write_app

ROLES = ("anonymous", "viewer", "operator", "admin")
RANK = {"anonymous": -1, "viewer": 0, "operator": 1, "admin": 2}
USERS = {"viewer": "viewer1", "operator": "operator1", "admin": "admin1"}
_unique = count()


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def populate(api: ApiServer, models: dict[str, Path], tmp: Path,
             admins: tuple[str, ...] = ("admin1", "admin2")) -> None:
    """Two versions of an app (so it can roll back), events with and without snapshots, a user per role."""
    packages.install_model(api.store, api.state_dir / "models", models["demo-detector"])
    rule = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "cooldown_s": 0}
    for version in ("1.0.0", "1.1.0"):
        packages.install_app(api.store, write_app(tmp / f"ppe-{version}.json", "ppe-watch", "demo-detector",
                                                  ["cameras/+/frame"], [rule], version=version))
    day = api.state_dir / "snapshots" / "2026-11-23"
    day.mkdir(parents=True)
    (day / "e1.jpg").write_bytes(jpeg())
    (day / "escape.jpg").symlink_to(api.state_dir / "appliance.db")  # resolves outside the snapshots folder
    for event in (
        EventRecord("e1", 1000.0, "ppe-watch", "cam1", "person-seen", "person", 0.9, (0.1, 0.1, 0.5, 0.6),
                    "snapshots/2026-11-23/e1.jpg", len(jpeg())),
        EventRecord("e2", 2000.0, "gas-watch", "gas1", "gas-anomaly", "anomaly", 7.5),
        EventRecord("e3", 3000.0, "ppe-watch", "cam2", "person-seen", "person", 0.7, None,
                    "snapshots/2026-11-23/escape.jpg", 10),
    ):
        api.store.events.add(event)
    for role, name in USERS.items():
        if role != "admin":
            api.add_user(name, role)  # type: ignore[arg-type]
    for name in admins:
        api.add_user(name, "admin")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("api") / "state")
    populate(server, models, server.state_dir.parent)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients(api: ApiServer) -> Iterator[dict[str, httpx.Client]]:
    out = {"anonymous": api.client(), **{role: api.login(name) for role, name in USERS.items()}}
    yield out
    for c in out.values():
        c.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    """A server of its own (own limiter, own users) for tests that count or remove things."""
    made: list[ApiServer] = []

    def make(**kwargs: Any) -> ApiServer:
        server = ApiServer(tmp_path / f"state{len(made)}", **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def audit_lines(api: ApiServer, action: str) -> list[Any]:
    return [a for a in api.store.audit_log.recent(500) if a.action == action]


# ---- every route x every role ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    path: str
    body: dict[str, Any] | None = None
    client: httpx.Client | None = None  # instead of the role's shared client (for logout)


@dataclass(frozen=True)
class Call:
    method: str
    route: str  # the path as the app declares it
    needs: str  # "anyone" or the least role allowed
    ok: int
    prepare: Callable[[ApiServer, str], Prepared] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.route}"


def _victim_user(api: ApiServer, role: str) -> Prepared:
    name = f"victim{next(_unique)}"
    api.add_user(name, "viewer")
    return Prepared(f"/api/v1/users/{name}")


def _victim_token(api: ApiServer, role: str) -> Prepared:
    record, _ = api.accounts.create_token("viewer1", "victim", LOCAL)
    return Prepared(f"/api/v1/tokens/{record.id}")


def _fresh_session(api: ApiServer, role: str) -> Prepared:
    return Prepared("/api/v1/logout", client=api.login(USERS[role]) if role in USERS else None)


def _own_password(api: ApiServer, role: str) -> Prepared:
    pw = api.passwords.get(USERS.get(role, ""), "x" * 12)
    return Prepared("/api/v1/me/password", {"current_password": pw, "new_password": pw})


def _login(api: ApiServer, role: str) -> Prepared:
    return Prepared("/api/v1/login", {"user": "viewer1", "password": api.passwords["viewer1"]},
                    client=api.client())


CALLS = [
    Call("POST", "/api/v1/login", "anyone", 200, _login),
    Call("POST", "/api/v1/logout", "viewer", 204, _fresh_session),
    Call("GET", "/api/v1/me", "viewer", 200),
    Call("PATCH", "/api/v1/me", "viewer", 200, lambda a, r: Prepared("/api/v1/me", {"language": "en"})),
    Call("POST", "/api/v1/me/password", "viewer", 204, _own_password),
    Call("GET", "/api/v1/status", "viewer", 200),
    Call("GET", "/api/v1/events", "viewer", 200),
    Call("GET", "/api/v1/events/{event_id}", "viewer", 200, lambda a, r: Prepared("/api/v1/events/e1")),
    Call("GET", "/api/v1/events/{event_id}/snapshot", "viewer", 200,
         lambda a, r: Prepared("/api/v1/events/e1/snapshot")),
    Call("POST", "/api/v1/events/{event_id}/handling", "operator", 201,
         lambda a, r: Prepared("/api/v1/events/e1/handling", {"action": "acknowledged", "note": f"by {r}"})),
    Call("GET", "/api/v1/apps", "viewer", 200),
    Call("POST", "/api/v1/apps/{name}/enable", "admin", 200, lambda a, r: Prepared("/api/v1/apps/ppe-watch/enable")),
    Call("POST", "/api/v1/apps/{name}/disable", "admin", 200,
         lambda a, r: Prepared("/api/v1/apps/ppe-watch/disable")),
    Call("POST", "/api/v1/apps/{name}/rollback", "admin", 200,
         lambda a, r: Prepared("/api/v1/apps/ppe-watch/rollback")),
    Call("GET", "/api/v1/appstore", "viewer", 200),
    Call("PUT", "/api/v1/appstore/subscriptions/{name}", "admin", 204,
         lambda a, r: Prepared("/api/v1/appstore/subscriptions/fall-watch")),
    Call("DELETE", "/api/v1/appstore/subscriptions/{name}", "admin", 204,
         lambda a, r: Prepared("/api/v1/appstore/subscriptions/fall-watch")),
    Call("GET", "/api/v1/users", "admin", 200),
    Call("POST", "/api/v1/users", "admin", 201, lambda a, r: Prepared(
        "/api/v1/users", {"name": f"new{next(_unique)}", "role": "viewer", "password": "a long new pass phrase"})),
    Call("PATCH", "/api/v1/users/{name}", "admin", 200,
         lambda a, r: Prepared(_victim_user(a, r).path, {"role": "operator", "language": "zh"})),
    Call("DELETE", "/api/v1/users/{name}", "admin", 204, _victim_user),
    Call("GET", "/api/v1/tokens", "admin", 200),
    Call("POST", "/api/v1/tokens", "admin", 201, lambda a, r: Prepared("/api/v1/tokens", {"name": "vms"})),
    Call("DELETE", "/api/v1/tokens/{token_id}", "admin", 204, _victim_token),
    Call("GET", "/api/v1/audit", "admin", 200),
    Call("GET", "/api/docs", "admin", 200),
    Call("GET", "/api/openapi.json", "admin", 200),
    Call("GET", "/healthz", "anyone", 200),
    Call("GET", "/metrics", "anyone", 200),
    Call("GET", "/api/status", "anyone", 200),  # from loopback; elsewhere 403 (see below)
    Call("GET", "/api/v1/upgrade", "viewer", 200),
    # this server has no AppStore link: an admin is told why nothing can be done (409), others lack the role
    Call("POST", "/api/v1/upgrade/{action}", "admin", 409, lambda a, r: Prepared("/api/v1/upgrade/check")),
    # `appliance upgrade`'s route wants its header, which no browser sends without a preflight
    Call("POST", "/api/upgrade/{action}", "anyone", 403, lambda a, r: Prepared("/api/upgrade/rollback")),
]


def expected(call: Call, role: str) -> int:
    if call.needs == "anyone":
        return call.ok
    if role == "anonymous":
        return 401
    return call.ok if RANK[role] >= RANK[call.needs] else 403


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_route_by_role(api: ApiServer, clients: dict[str, httpx.Client], call: Call, role: str) -> None:
    prepared = call.prepare(api, role) if call.prepare else Prepared(call.route)
    client = prepared.client or clients[role]
    r = client.request(call.method, prepared.path, json=prepared.body)
    want = expected(call, role)
    assert r.status_code == want, f"{call} as {role}: {r.status_code} {r.text[:300]}"
    if want in (401, 403) and call.needs != "anyone":
        message = r.json()["error"]
        assert ("log in" in message) if want == 401 else (f"needs the {call.needs} role" in message), message


def test_matrix_covers_every_route(api: ApiServer) -> None:
    routes = [*api.app.routes, *api_router.routes]  # the app's own, and those it includes from the API router
    declared = {(m, r.path) for r in routes if isinstance(r, APIRoute) for m in r.methods}
    assert declared == {(c.method, c.route) for c in CALLS}, \
        f"routes and role matrix differ: {declared ^ {(c.method, c.route) for c in CALLS}}"


# ---- sessions, CSRF, tokens ----------------------------------------------------------------------------


def test_session_cookie_flags(api: ApiServer) -> None:
    r = api.client().post("/api/v1/login", json={"user": "viewer1", "password": api.passwords["viewer1"]})
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    for flag in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age="):
        assert flag in cookie, cookie
    assert "Secure" not in cookie, "plain HTTP: a Secure cookie would never come back"
    assert r.json()["user"] == {"name": "viewer1", "role": "viewer", "language": "en", "created": pytest.approx(
        r.json()["user"]["created"]), "disabled": False}


def test_csrf_token_required_with_the_session_cookie(api: ApiServer) -> None:
    c = api.login("operator1")
    token = c.headers.pop(CSRF_HEADER)
    assert c.get("/api/v1/me").status_code == 200, "reading needs no CSRF token"
    before = len(api.store.handling.for_events(["e2"]).get("e2", []))
    r = c.post("/api/v1/events/e2/handling", json={"action": "acknowledged"})
    assert r.status_code == 403
    assert "CSRF token" in r.json()["error"] and CSRF_HEADER in r.json()["error"]
    r = c.post("/api/v1/events/e2/handling", json={"action": "acknowledged"}, headers={CSRF_HEADER: "forged"})
    assert r.status_code == 403 and "wrong CSRF token" in r.json()["error"]
    assert len(api.store.handling.for_events(["e2"]).get("e2", [])) == before, "nothing stored when refused"
    # another session's token does not fit this session
    other = api.login("operator1").headers[CSRF_HEADER]
    assert c.post("/api/v1/events/e2/handling", json={"action": "note"},
                  headers={CSRF_HEADER: other}).status_code == 403
    # an HTML form sends it as a field
    assert c.post("/api/v1/logout", data={"csrf_token": "forged"}).status_code == 403
    assert c.post("/api/v1/logout", data={"csrf_token": token}).status_code == 204
    assert c.get("/api/v1/me").status_code == 401


def test_ended_session_says_to_log_in_again(api: ApiServer) -> None:
    c = api.login("viewer1")
    assert c.post("/api/v1/logout").status_code == 204
    c.cookies.set(SESSION_COOKIE, "stale")
    r = c.get("/api/v1/me")
    assert r.status_code == 401 and "session has ended" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_api_token(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    admin = clients["admin"]
    r = admin.post("/api/v1/tokens", json={"name": "vms-integration", "user": "operator1"})
    assert r.status_code == 201
    made = r.json()
    assert made["token"].startswith("apl_") and made["user"] == "operator1" and made["last_used"] is None
    listed = admin.get("/api/v1/tokens").json()
    assert {"id": made["id"], "name": "vms-integration", "user": "operator1", "created": made["created"],
            "last_used": None} in listed
    assert made["token"] not in admin.get("/api/v1/tokens").text, "the secret is shown once"

    bot = api.token_client(made["token"])
    r = bot.post("/api/v1/events/e2/handling", json={"action": "note", "note": "seen by the VMS"})
    assert r.status_code == 201, "a token needs no CSRF token"
    assert r.json()["user"] == "operator1"
    assert bot.get("/api/v1/users").status_code == 403, "the token carries its user's role"
    assert bot.post("/api/v1/logout").status_code == 400
    token = next(t for t in admin.get("/api/v1/tokens").json() if t["id"] == made["id"])
    assert token["last_used"] is not None

    assert admin.delete(f"/api/v1/tokens/{made['id']}").status_code == 204
    r = bot.get("/api/v1/me")
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert admin.delete(f"/api/v1/tokens/{made['id']}").status_code == 404
    assert api.token_client("apl_made-up").get("/api/v1/me").status_code == 401


def test_token_of_a_disabled_user_stops_working(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    admin = clients["admin"]
    api.add_user("camera-bot", "viewer")
    secret = admin.post("/api/v1/tokens", json={"name": "bot", "user": "camera-bot"}).json()["token"]
    assert api.token_client(secret).get("/api/v1/events").status_code == 200
    assert admin.patch("/api/v1/users/camera-bot", json={"disabled": True}).json()["disabled"] is True
    assert api.token_client(secret).get("/api/v1/events").status_code == 401
    assert admin.post("/api/v1/tokens", json={"name": "x", "user": "nobody"}).status_code == 404


# ---- logins: no default account, rate limits -----------------------------------------------------------


def test_no_login_before_an_admin_exists(fresh: Callable[..., ApiServer]) -> None:
    api = fresh()
    for user in ("admin", "root", ""):
        r = api.client().post("/api/v1/login", json={"user": user or "x", "password": "admin"})
        assert r.status_code == 401
        assert "appliance users add NAME --role admin" in r.json()["error"]
    assert api.client().get("/api/v1/me").status_code == 401


def test_wrong_password_and_unknown_user_read_the_same(fresh: Callable[..., ApiServer]) -> None:
    api = fresh()
    api.add_user("nurse", "viewer")
    c = api.client()
    wrong = c.post("/api/v1/login", json={"user": "nurse", "password": "not her password"})
    unknown = c.post("/api/v1/login", json={"user": "nobody", "password": "not her password"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"error": "wrong user name or password"}
    assert c.post("/api/v1/login", json={"user": "NURSE", "password": api.passwords["nurse"]}).json()["user"][
        "name"] == "nurse", "names compare without case"


def test_login_rate_limited_per_user_and_address(fresh: Callable[..., ApiServer]) -> None:
    api = fresh()
    password = api.add_user("supervisor", "operator")
    attacker = api.client(local_address="127.0.0.1")
    for _ in range(5):
        r = attacker.post("/api/v1/login", json={"user": "supervisor", "password": "guess-guess-guess"})
        assert r.status_code == 401
    r = attacker.post("/api/v1/login", json={"user": "supervisor", "password": password})
    assert r.status_code == 429, "the 6th attempt is refused, even with the right password"
    assert 0 < int(r.headers["retry-after"]) <= 300
    assert "too many failed logins" in r.json()["error"] and "try again in" in r.json()["error"]
    assert SESSION_COOKIE not in r.cookies

    tablet = api.client(local_address="127.0.0.2")
    r = tablet.post("/api/v1/login", json={"user": "supervisor", "password": password})
    assert r.status_code == 200, "the real user on another device still gets in"

    failed = audit_lines(api, "login.failed")
    assert len(failed) == 5 and {(a.actor, a.address) for a in failed} == {("supervisor", "127.0.0.1")}
    assert [(a.actor, a.address) for a in audit_lines(api, "login")] == [("supervisor", "127.0.0.2")]


def test_login_rate_limited_per_address_across_names(fresh: Callable[..., ApiServer]) -> None:
    api = fresh(limits=LoginLimits(per_address=4))
    password = api.add_user("dispatcher", "viewer")
    sprayer = api.client(local_address="127.0.0.3")
    for i in range(4):
        assert sprayer.post("/api/v1/login", json={"user": f"user{i}", "password": "Spring2026!"}).status_code == 401
    r = sprayer.post("/api/v1/login", json={"user": "dispatcher", "password": password})
    assert r.status_code == 429 and "from 127.0.0.3" in r.json()["error"]
    assert api.client().post("/api/v1/login", json={"user": "dispatcher", "password": password}).status_code == 200
    assert {a.actor for a in audit_lines(api, "login.failed")} == {"(unknown user)"}, \
        "a name that is no user is not recorded: it may be a password typed in the wrong field"


# ---- users ----------------------------------------------------------------------------------------------


def test_user_management(fresh: Callable[..., ApiServer]) -> None:
    api = fresh()
    api.add_user("boss", "admin")
    admin = api.login("boss")
    r = admin.post("/api/v1/users", json={"name": "nurse", "role": "viewer", "password": "short"})
    assert r.status_code == 422 and r.json()["fields"] == ["body.password"] and "at least 10" in r.json()["error"]
    r = admin.post("/api/v1/users", json={"name": "nurse", "role": "viewer", "password": "nurse-nurse-nurse"})
    assert r.status_code == 422 and r.json()["fields"] == ["password"] and "user name" in r.json()["error"]
    r = admin.post("/api/v1/users", json={"name": "nurse", "role": "viewer", "password": "ward 7 night shift"})
    assert r.status_code == 201 and r.json()["role"] == "viewer"
    api.passwords["nurse"] = "ward 7 night shift"
    r = admin.post("/api/v1/users", json={"name": "NURSE", "role": "viewer", "password": "ward 7 night shift"})
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    r = admin.post("/api/v1/users", json={"name": "bad name!", "role": "viewer", "password": "ward 7 night shift"})
    assert r.status_code == 422 and r.json()["fields"] == ["body.name"]

    nurse = api.login("nurse")
    assert nurse.post("/api/v1/events/x/handling", json={"action": "note"}).status_code == 403
    admin.patch("/api/v1/users/nurse", json={"role": "operator"})
    assert nurse.post("/api/v1/events/x/handling", json={"action": "note"}).status_code == 404, \
        "a new role applies at once (the event does not exist)"
    admin.patch("/api/v1/users/nurse", json={"disabled": True})
    r = nurse.get("/api/v1/me")
    assert r.status_code == 401, "disabling ends the sessions"
    r = api.client().post("/api/v1/login", json={"user": "nurse", "password": api.passwords["nurse"]})
    assert r.status_code == 401 and "disabled" in r.json()["error"]

    r = admin.delete("/api/v1/users/boss")
    assert r.status_code == 409 and "last enabled admin" in r.json()["error"]
    r = admin.patch("/api/v1/users/boss", json={"role": "operator"})
    assert r.status_code == 409
    assert admin.delete("/api/v1/users/nurse").status_code == 204
    assert admin.delete("/api/v1/users/nurse").status_code == 404
    assert [u["name"] for u in admin.get("/api/v1/users").json()] == ["boss"]


def test_own_password_and_language(fresh: Callable[..., ApiServer]) -> None:
    api = fresh()
    old = api.add_user("radiographer", "viewer")
    tablet, desk = api.login("radiographer"), api.login("radiographer")
    r = desk.post("/api/v1/me/password", json={"current_password": "wrong wrong wrong", "new_password": "x" * 12})
    assert r.status_code == 401 and "current password is wrong" in r.json()["error"]
    r = desk.post("/api/v1/me/password", json={"current_password": old, "new_password": "abc"})
    assert r.status_code == 422 and r.json()["fields"] == ["body.new_password"]
    r = desk.post("/api/v1/me/password", json={"current_password": old, "new_password": "1234567890"})
    assert r.status_code == 422 and r.json()["fields"] == ["password"] and "guess" in r.json()["error"]
    r = desk.post("/api/v1/me/password", json={"current_password": old, "new_password": "a new long phrase"})
    assert r.status_code == 204
    assert desk.get("/api/v1/me").status_code == 200, "the session that changed it stays"
    assert tablet.get("/api/v1/me").status_code == 401, "every other session ends"
    assert desk.patch("/api/v1/me", json={"language": "zh"}).json()["language"] == "zh"
    assert desk.get("/api/v1/me").json()["language"] == "zh"
    assert desk.patch("/api/v1/me", json={"language": "fr"}).status_code == 422


# ---- events and handling ------------------------------------------------------------------------------


def test_handling_is_stored_with_who_and_when(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    before = time.time()
    r = clients["operator"].post("/api/v1/events/e2/handling",
                                 json={"action": "false_positive", "note": "a welder's torch, not gas"})
    after = time.time()
    assert r.status_code == 201
    assert r.json()["user"] == "operator1" and before <= r.json()["ts"] <= after
    event = clients["viewer"].get("/api/v1/events/e2").json()
    mine = [h for h in event["handling"] if h["action"] == "false_positive"]
    assert mine == [{"action": "false_positive", "note": "a welder's torch, not gas", "user": "operator1",
                     "ts": r.json()["ts"]}]
    listed = {e["id"]: e for e in clients["viewer"].get("/api/v1/events").json()}
    assert mine[0] in listed["e2"]["handling"]
    stored = api.store.handling.for_events(["e2"])["e2"]
    assert any(h.user == "operator1" and h.action == "false_positive" and h.ts == r.json()["ts"] for h in stored)
    assert clients["viewer"].post("/api/v1/events/e2/handling", json={"action": "acknowledged"}).status_code == 403
    r = clients["operator"].post("/api/v1/events/nope/handling", json={"action": "acknowledged"})
    assert r.status_code == 404 and "not stored" in r.json()["error"]


def test_event_filters(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    c = clients["viewer"]

    def ids(**params: Any) -> list[str]:
        r = c.get("/api/v1/events", params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()]

    assert ids() == ["e3", "e2", "e1"]
    assert ids(app="ppe-watch") == ["e3", "e1"]
    assert ids(source="gas1") == ["e2"]
    assert ids(label="person", since=1000, until=3000) == ["e1"]
    assert ids(limit=1) == ["e3"]
    e1 = c.get("/api/v1/events/e1").json()
    assert e1["box"] == [0.1, 0.1, 0.5, 0.6] and e1["snapshot_url"] == "/api/v1/events/e1/snapshot"
    assert c.get("/api/v1/events/e2").json()["snapshot_url"] is None
    r = c.get("/api/v1/events", params={"limit": 0})
    assert r.status_code == 422 and r.json()["fields"] == ["query.limit"]
    assert c.get("/api/v1/events", params={"since": "yesterday"}).json()["fields"] == ["query.since"]


def test_snapshot_served_only_from_the_snapshots_folder(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    c = clients["viewer"]
    r = c.get("/api/v1/events/e1/snapshot")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content == jpeg()
    r = c.get("/api/v1/events/e3/snapshot")
    assert r.status_code == 404, "a snapshot that resolves outside the snapshots folder is not served"
    assert b"SQLite" not in r.content
    assert c.get("/api/v1/events/e2/snapshot").json() == {"error": "event e2 has no snapshot"}
    assert c.get("/api/v1/events/nope/snapshot").status_code == 404


# ---- apps -----------------------------------------------------------------------------------------------


def test_apps_enable_disable_rollback(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    admin = clients["admin"]
    apps = {a["name"]: a for a in clients["viewer"].get("/api/v1/apps").json()}
    assert apps["ppe-watch"]["model"] == "demo-detector@1.0.0" and apps["ppe-watch"]["sources"] == ["cameras/+/frame"]
    assert apps["ppe-watch"]["state"] == "serving" and apps["ppe-watch"]["partition"] == "cpu"
    assert admin.post("/api/v1/apps/ppe-watch/disable").json()["enabled"] is False
    assert api.store.apps.get("ppe-watch").enabled is False  # type: ignore[union-attr]
    assert admin.post("/api/v1/apps/ppe-watch/enable").json()["enabled"] is True
    version = api.store.apps.get("ppe-watch").version  # type: ignore[union-attr]
    r = admin.post("/api/v1/apps/ppe-watch/rollback")
    assert r.status_code == 200 and r.json()["version"] != version and r.json()["previous_version"] == version
    assert admin.post("/api/v1/apps/nope/rollback").status_code == 404
    assert admin.post("/api/v1/apps/nope/enable").status_code == 404
    assert clients["operator"].post("/api/v1/apps/ppe-watch/disable").status_code == 403
    assert api.store.apps.get("ppe-watch").enabled is True  # type: ignore[union-attr]


def test_rollback_without_a_previous_version_is_a_conflict(fresh: Callable[..., ApiServer],
                                                           models: dict[str, Path], tmp_path: Path) -> None:
    api = fresh()
    packages.install_model(api.store, api.state_dir / "models", models["demo-detector"])
    packages.install_app(api.store, write_app(tmp_path / "a.json", "only", "demo-detector", ["cameras/+/frame"],
                                              [{"name": "r", "labels": ["person"], "min_score": 0.5}]))
    api.add_user("boss", "admin")
    r = api.login("boss").post("/api/v1/apps/only/rollback")
    assert r.status_code == 409 and "no previous version" in r.json()["error"]


# ---- audit and secrets --------------------------------------------------------------------------------


def test_every_change_is_audited_with_who_what_where(fresh: Callable[..., ApiServer], models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    api = fresh()
    populate(api, models, tmp_path)
    admin = api.login("admin1", local_address="127.0.0.5")
    operator = api.login("operator1", local_address="127.0.0.6")
    api.client(local_address="127.0.0.7").post("/api/v1/login", json={"user": "viewer1", "password": "wrong-wrong"})
    operator.post("/api/v1/events/e1/handling", json={"action": "missed_detection", "note": "a second person"})
    admin.post("/api/v1/apps/ppe-watch/disable")
    admin.post("/api/v1/apps/ppe-watch/enable")
    admin.post("/api/v1/apps/ppe-watch/rollback")
    admin.post("/api/v1/users", json={"name": "nurse", "role": "viewer", "password": "ward 7 night shift"})
    admin.patch("/api/v1/users/nurse", json={"role": "operator", "password": "ward 8 day shift!"})
    token = admin.post("/api/v1/tokens", json={"name": "vms", "user": "nurse"}).json()
    admin.delete(f"/api/v1/tokens/{token['id']}")
    admin.delete("/api/v1/users/nurse")
    operator.patch("/api/v1/me", json={"language": "zh"})
    operator.post("/api/v1/logout")

    lines = admin.get("/api/v1/audit").json()
    by_action: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_action.setdefault(line["action"], []).append(line)

    def one(what: str, actor: str, address: str, **detail: Any) -> None:
        found = [a for a in by_action.get(what, []) if a["actor"] == actor and a["address"] == address
                 and all(a["detail"].get(k) == v for k, v in detail.items())]
        assert found, f"no audit line {what} by {actor} from {address} with {detail}: {by_action.get(what)}"
        assert abs(found[0]["ts"] - time.time()) < 60

    one("login", "admin1", "127.0.0.5")
    one("login", "operator1", "127.0.0.6")
    one("login.failed", "viewer1", "127.0.0.7", reason="wrong password")
    one("event.handle", "operator1", "127.0.0.6", event="e1", action="missed_detection", note="a second person")
    one("app.disable", "admin1", "127.0.0.5", app="ppe-watch")
    one("app.enable", "admin1", "127.0.0.5", app="ppe-watch")
    one("app.rollback", "admin1", "127.0.0.5", app="ppe-watch", **{"from": "1.1.0", "to": "1.0.0"})
    one("user.add", "admin1", "127.0.0.5", user="nurse", role="viewer")
    one("user.update", "admin1", "127.0.0.5", user="nurse", changes={"role": "operator", "password": "changed"})
    one("token.create", "admin1", "127.0.0.5", token=token["id"], user="nurse", name="vms")
    one("token.revoke", "admin1", "127.0.0.5", token=token["id"])
    one("user.remove", "admin1", "127.0.0.5", user="nurse")
    one("user.update", "operator1", "127.0.0.6", user="operator1", changes={"language": "zh"})
    one("logout", "operator1", "127.0.0.6")


def test_secrets_never_in_logs_audit_or_database(fresh: Callable[..., ApiServer], caplog: pytest.LogCaptureFixture,
                                                 ) -> None:
    for name in ("appliance", "uvicorn", "fastapi"):
        caplog.set_level(logging.DEBUG, logger=name)
    api = fresh()
    secrets = [api.add_user("boss", "admin", "chief secret pass phrase 1")]
    admin = api.login("boss")
    for attempt in ("chief secret typo phrase", "chief secret pass phrase 2"):
        secrets.append(attempt)
        api.client().post("/api/v1/login", json={"user": "boss", "password": attempt})
        api.client().post("/api/v1/login", json={"user": attempt, "password": attempt})  # password as user name
    secrets.append("nurse secret pass phrase")
    admin.post("/api/v1/users", json={"name": "nurse", "role": "viewer", "password": secrets[-1]})
    secrets.append("nurse newer pass phrase")
    admin.patch("/api/v1/users/nurse", json={"password": secrets[-1]})
    secrets.append("x" * 2000)
    r = admin.post("/api/v1/users", json={"name": "long", "role": "viewer", "password": secrets[-1]})
    assert r.status_code == 422 and secrets[-1] not in r.text, "a refused body is not echoed"
    secrets.append(admin.post("/api/v1/tokens", json={"name": "vms"}).json()["token"])
    secrets.append(admin.headers[CSRF_HEADER])
    secrets.append(admin.cookies[SESSION_COOKIE])

    audit = admin.get("/api/v1/audit").text
    server_log = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                           if r.name.startswith(("appliance", "uvicorn", "fastapi")))
    database = b"".join(p.read_bytes() for p in api.state_dir.glob("appliance.db*"))
    for secret in secrets:
        assert secret not in server_log, "a secret in the log"
        assert secret not in audit, "a secret in the audit log"
        if secret != admin.headers[CSRF_HEADER]:  # the CSRF token is kept to compare (it is no credential alone)
            assert secret.encode() not in database, "a secret stored in clear"
    assert "login failed for boss from 127.0.0.1" in server_log, "failures are logged, with the user and address"


# ---- the rest of the HTTP surface ---------------------------------------------------------------------


def test_docs_and_schema_for_admins(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    schema = clients["admin"].get("/api/openapi.json").json()
    assert "/api/v1/login" in schema["paths"] and "/healthz" not in schema["paths"]
    assert set(schema["components"]["securitySchemes"]) == {"token", "session"}
    needs = {(m.upper(), path): op["x-required-role"] for path, ops in schema["paths"].items() for m, op in ops.items()}
    assert needs == {(c.method, c.route): c.needs for c in CALLS if c.route.startswith("/api/v1/")}, \
        "the schema says what each route needs, the same as the matrix"
    page = clients["admin"].get("/api/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert "/api/v1/events/{event_id}/handling" in page.text and "<script" not in page.text, "works offline"
    assert "cdn" not in page.text.lower()


def test_status_is_described_in_the_schema(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    schema = clients["admin"].get("/api/openapi.json").json()
    answer = schema["paths"]["/api/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/DaemonStatus"}
    parts = schema["components"]["schemas"]
    top = parts["DaemonStatus"]["properties"]
    assert {"health", "broker", "partitions", "workers", "models", "apps", "sources", "unknown_sources", "events",
            "appstore", "samples"} <= set(top)
    assert {"PartitionStatus", "WorkerStatus", "ModelStatus", "AppStatus", "SourceStatus", "SyncStatus",
            "SamplesStatus"} <= set(parts), "every part has its own schema"
    assert parts["AppStatus"]["properties"]["state"]["enum"] == ["serving", "degraded", "disabled", "not placed"]
    got = clients["viewer"].get("/api/v1/status").json()
    assert DaemonStatus.model_validate(got) == fake_status(), "the answer reads back as the schema says"
    link = clients["viewer"].get("/api/v1/appstore").json()
    assert link["state"] == "off" and isinstance(link["subscriptions"], list)
    assert "AppStoreOut" in parts


def test_errors_are_json_with_what_to_do(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    c = clients["admin"]
    r = c.get("/api/v1/nothing-here")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
    r = c.put("/api/v1/users")
    assert r.status_code == 405 and r.json() == {"error": "PUT is not allowed on /api/v1/users"}
    r = c.post("/api/v1/events/e1/handling", json={"action": "shrug"})
    assert r.status_code == 422 and r.json()["fields"] == ["body.action"] and "acknowledged" in r.json()["error"]
    r = c.post("/api/v1/events/e1/handling", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = c.post("/api/v1/users", json={"name": "x", "role": "viewer", "password": "ward 7 night shift", "admin": 1})
    assert r.status_code == 422 and r.json()["fields"] == ["body.admin"] and "unknown field" in r.json()["error"]


def test_security_headers(api: ApiServer, clients: dict[str, httpx.Client]) -> None:
    r = clients["viewer"].get("/api/v1/me")
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers or "uvicorn" not in r.headers["server"]


def test_status_for_the_cli_answers_loopback_only(api: ApiServer) -> None:
    # Only the address check is exercised here: tests send traffic to loopback addresses only.
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.0.1")
    assert not is_loopback("10.0.0.7") and not is_loopback("unknown")
    assert api.client().get("/api/status").json()["device"] == "test"


# ---- schemathesis: no input makes the server fail -------------------------------------------------------


# Operations that can take away the run's own credential: revoke its token, remove or disable its user.
SELF_DESTRUCTIVE = r"^(DELETE /api/v1/tokens/\{token_id\}|DELETE /api/v1/users/\{name\}|PATCH /api/v1/users/\{name\})$"
NO_REUSE = """
[phases.coverage]
extra-data-sources = { responses = false }
[phases.fuzzing]
extra-data-sources = { responses = false }
"""


def _schemathesis(api: ApiServer, token: str, cwd: Path, *options: str) -> str:
    """Run schemathesis against the served schema as an admin; returns its report."""
    r = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", *options[:2], "run", f"{api.url}/api/openapi.json",
         "--header", f"Authorization: Bearer {token}", "--checks", "not_a_server_error",
         "--max-examples", "20", "--seed", "20261123", "--workers", "4", "--request-timeout", "30",
         "--phases", "fuzzing", "--no-color", *options[2:]],
        capture_output=True, text=True, timeout=400, check=False, cwd=cwd)
    assert r.returncode == 0, f"schemathesis found problems:\n{r.stdout[-8000:]}\n{r.stderr[-2000:]}"
    assert "Authentication failed" not in r.stdout, f"the run lost its credential:\n{r.stdout[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(fresh: Callable[..., ApiServer], models: dict[str, Path],
                                            tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    api = fresh()
    populate(api, models, tmp_path)
    (tmp_path / "reuse.toml").write_text("")
    _, token = api.accounts.create_token("admin1", "schemathesis", LOCAL)
    # schemathesis reuses values from answers (ids, names): that finds the stored events and apps, but would
    # also revoke its own token or disable its own user, leaving the rest of the run at 401. So those three
    # operations run apart, with values made up rather than reused.
    report = _schemathesis(api, token, tmp_path, "--config-file", str(tmp_path / "reuse.toml"),
                           "--exclude-name-regex", SELF_DESTRUCTIVE)
    assert "Tested: 24" in report, report[-3000:]
    (tmp_path / "no-reuse.toml").write_text(NO_REUSE)
    report = _schemathesis(api, token, tmp_path, "--config-file", str(tmp_path / "no-reuse.toml"),
                           "--include-name-regex", SELF_DESTRUCTIVE)
    assert "Tested: 3" in report, report[-3000:]
    assert api.client().get("/healthz").json()["status"] == "ok"
