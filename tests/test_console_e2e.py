"""The console's accounts and API on the real daemon: the first admin from the CLI, TLS, a real event handled."""

from __future__ import annotations

import getpass
import io
import json
import ssl
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.demo.scene import render_frame
from tests.conftest import DaemonFactory, Publisher, mosquitto_with_password, wait_until, write_app
from tests.test_broker_auth import make_pki

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a brand new pass phrase"


def login(base_url: str, user: str, password: str, verify: Any = True) -> httpx.Response:
    return httpx.post(f"{base_url}/api/v1/login", json={"user": user, "password": password}, verify=verify,
                      timeout=30)


def test_first_admin_comes_from_the_cli(make_daemon: DaemonFactory) -> None:
    d = make_daemon()
    r = login(d.base_url, "admin", "admin")
    assert r.status_code == 401 and "appliance users add NAME --role admin" in r.json()["error"], \
        "no default account, and the refusal says how to make the first one"
    assert "no users yet" in d.cli("users", "list").stdout

    r2 = d.cli("users", "add", "boss", "--role", "admin", check=False)
    assert r2.returncode == 2 and "--password-stdin" in r2.stderr, "no terminal: the CLI says how to pipe it"
    r2 = d.cli("users", "add", "boss", "--role", "admin", "--password-stdin", input="too short\n", check=False)
    assert r2.returncode == 2 and "at least 10 characters" in r2.stderr
    out = d.cli("users", "add", "boss", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    assert "added admin boss" in out.stdout
    r2 = d.cli("users", "add", "Boss", "--role", "viewer", "--password-stdin", input=PASSWORD + "\n", check=False)
    assert r2.returncode == 2 and "already exists" in r2.stderr
    d.cli("users", "add", "nurse", "--role", "viewer", "--language", "zh", "--password-stdin",
          input="ward seven nights\n")
    listed = d.cli("users", "list").stdout
    assert "boss" in listed and "admin" in listed and "nurse" in listed and "zh" in listed

    r = login(d.base_url, "boss", PASSWORD)
    assert r.status_code == 200 and r.json()["user"]["role"] == "admin", "the daemon sees the new user at once"
    session = httpx.Client(base_url=d.base_url, cookies=r.cookies, headers={"X-CSRF-Token": r.json()["csrf_token"]})

    d.cli("users", "passwd", "boss", "--password-stdin", input=NEW_PASSWORD + "\n")
    assert session.get("/api/v1/me").status_code == 401, "a new password ends the sessions"
    assert login(d.base_url, "boss", PASSWORD).status_code == 401
    r = login(d.base_url, "boss", NEW_PASSWORD)
    assert r.status_code == 200
    admin = httpx.Client(base_url=d.base_url, cookies=r.cookies, headers={"X-CSRF-Token": r.json()["csrf_token"]})

    r2 = d.cli("users", "remove", "boss", check=False)
    assert r2.returncode == 2 and "last enabled admin" in r2.stderr
    d.cli("users", "remove", "nurse")
    assert [u["name"] for u in admin.get("/api/v1/users").json()] == ["boss"]

    audit = admin.get("/api/v1/audit").json()
    cli_actor = f"cli:{getpass.getuser()}"
    assert {(a["action"], a["actor"], a["address"]) for a in audit} >= {
        ("user.add", cli_actor, "local"), ("user.update", cli_actor, "local"), ("user.remove", cli_actor, "local"),
        ("login", "boss", "127.0.0.1"), ("login.failed", "boss", "127.0.0.1")}

    assert "health" in d.cli("status", "--json").stdout, "`appliance status` still works, on loopback"
    assert d.status()["health"]["ok"]
    everything = d.log() + str(audit) + listed + out.stdout + out.stderr
    for secret in (PASSWORD, NEW_PASSWORD, "ward seven nights", "too short"):
        assert secret not in everything, "a password in the log, the audit or the CLI's output"


def test_console_over_tls(tmp_path: Path, make_daemon: DaemonFactory) -> None:
    make_pki(tmp_path)
    d = make_daemon(start=False, extra=f"""
        tls_cert = "{tmp_path}/server.pem"
        tls_key = "{tmp_path}/server.key"
        """)
    d.ssl_context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    d.start()
    assert d.healthz()[0] == 200
    assert d.base_url.startswith("https://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{d.http_port}/healthz", timeout=5).raise_for_status()

    d.cli("users", "add", "boss", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    r = login(d.base_url, "boss", PASSWORD, verify=d.ssl_context)
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert f"HTTP https://127.0.0.1:{d.http_port}" in d.log()
    status = d.cli("status").stdout
    assert "health OK" in status, "the CLI reaches the daemon over TLS, trusting exactly its certificate"


def test_bad_tls_files_stop_the_daemon_with_a_message(tmp_path: Path, make_daemon: DaemonFactory) -> None:
    (tmp_path / "not-a-cert.pem").write_text("hello")
    d = make_daemon(start=False, extra=f"""
        tls_cert = "{tmp_path}/not-a-cert.pem"
        tls_key = "{tmp_path}/not-a-cert.pem"
        """)
    r = d.cli("run", check=False)
    assert r.returncode == 2 and "cannot use http.tls_cert" in r.stderr, r.stderr
    r = make_daemon(start=False, extra=f'tls_cert = "{tmp_path}/not-a-cert.pem"\n').cli("run", check=False)
    assert r.returncode == 2 and "tls_cert and tls_key must be given together" in r.stderr


def test_a_real_event_is_handled_through_the_api(make_daemon: DaemonFactory, models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    d = make_daemon(start=False)
    d.cli("models", "add", str(models["demo-detector"]))
    rule = {"name": "person-seen", "labels": ["person"], "min_score": 0.5, "debounce": {"n": 1, "m": 1},
            "cooldown_s": 0}
    d.cli("apps", "add", str(write_app(tmp_path / "ppe.json", "ppe-watch", "demo-detector", ["cameras/+/frame"],
                                       [rule])))
    d.cli("users", "add", "boss", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    d.cli("users", "add", "shift-lead", "--role", "operator", "--password-stdin", input="the night shift lead\n")
    d.start()
    wait_until(lambda: {a["name"]: a["state"] for a in d.status()["apps"]}.get("ppe-watch") == "serving", 30,
               what="the app serving")
    r = login(d.base_url, "boss", PASSWORD)
    admin = httpx.Client(base_url=d.base_url, cookies=r.cookies, headers={"X-CSRF-Token": r.json()["csrf_token"]})
    token = admin.post("/api/v1/tokens", json={"name": "vms", "user": "shift-lead"}).json()["token"]
    operator = httpx.Client(base_url=d.base_url, headers={"Authorization": f"Bearer {token}"})

    pub = Publisher(d.mqtt_port)
    try:
        pub.publish("cameras/cam1/frame", render_frame(0.0, 0))
        events = wait_until(lambda: operator.get("/api/v1/events", params={"app": "ppe-watch"}).json(), 30,
                            what="an event through the API")
    finally:
        pub.close()
    event = events[0]
    assert event["source"] == "cam1" and event["label"] == "person" and event["handling"] == []
    snapshot = operator.get(event["snapshot_url"])
    assert snapshot.status_code == 200 and snapshot.content[:2] == b"\xff\xd8"

    r = operator.post(f"/api/v1/events/{event['id']}/handling", json={"action": "acknowledged", "note": "on it"})
    assert r.status_code == 201
    handled = operator.get(f"/api/v1/events/{event['id']}").json()["handling"]
    assert handled == [{"action": "acknowledged", "note": "on it", "user": "shift-lead", "ts": r.json()["ts"]}]

    assert admin.post("/api/v1/apps/ppe-watch/disable").json()["enabled"] is False
    wait_until(lambda: next(a for a in admin.get("/api/v1/apps").json() if a["name"] == "ppe-watch")["state"]
               == "disabled", 10, what="the daemon to apply the disable")
    lines = {(a["action"], a["actor"]) for a in admin.get("/api/v1/audit").json()}
    assert {("event.handle", "shift-lead"), ("app.disable", "boss"), ("token.create", "boss")} <= lines
    installs = {(a["action"], a["actor"], a["address"]) for a in admin.get("/api/v1/audit").json()}
    cli = f"cli:{getpass.getuser()}"
    assert {("model.install", cli, "local"), ("app.install", cli, "local")} <= installs, "the CLI's own lines"
    api_status = admin.get("/api/v1/status").json()
    assert api_status["device"] == d.device and api_status["health"]["ok"]


def test_diagnostics_bundle_has_what_support_needs_and_no_secrets(tmp_path: Path,
                                                                   make_daemon: DaemonFactory) -> None:
    broker = mosquitto_with_password(tmp_path, "appliance", "s3cret-broker-pw")
    try:
        d = make_daemon(broker_port=broker.port, broker_extra='username = "appliance"\npassword = "s3cret-broker-pw"')
        d.cli("users", "add", "lead", "--role", "operator", "--password-stdin", input=PASSWORD + "\n")
        d.cli("users", "add", "nurse", "--role", "viewer", "--password-stdin", input=NEW_PASSWORD + "\n")
        viewer = httpx.Client(base_url=d.base_url, timeout=30)
        viewer.post("/login", data={"user": "nurse", "password": NEW_PASSWORD})
        assert viewer.get("/system/diagnostics.zip").status_code == 403, "viewers cannot download it"
        operator = httpx.Client(base_url=d.base_url, timeout=30)
        assert operator.post("/login", data={"user": "lead", "password": PASSWORD}).status_code == 303
        assert 'href="/system/diagnostics.zip"' in operator.get("/system").text
        r = operator.get("/system/diagnostics.zip")
    finally:
        broker.stop()
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert f'filename="diagnostics-{d.device}-' in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        files = {name: z.read(name).decode() for name in z.namelist()}
    assert set(files) == {"status.json", "settings.json", "logs.txt", "audit.json", "hardware.json", "versions.json"}
    settings = json.loads(files["settings.json"])
    assert settings["broker"]["password"] == "<redacted>" and settings["broker"]["username"] == "appliance"
    assert json.loads(files["status.json"])["device"] == d.device
    assert "HTTP http://127.0.0.1" in files["logs.txt"], "the daemon's own log lines"
    assert any(a["action"] == "login" and a["actor"] == "lead" for a in json.loads(files["audit.json"]))
    assert json.loads(files["versions.json"])["appliance"]
    bundle = "".join(files.values())
    for secret in ("s3cret-broker-pw", PASSWORD, NEW_PASSWORD):
        assert secret not in bundle, "a secret in the diagnostics bundle"
