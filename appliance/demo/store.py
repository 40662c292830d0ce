"""The demo's AppStore: a TUF repository in the state folder, served on loopback, with a channel ``demo``.

The first run makes the repository (keys, the demo models and apps, the channel) and registers this
appliance as a device; the appliance then installs its apps from the AppStore like a real one, and picks
up what is published later by itself (``python -m appliance.demo.publish``, which ``make demo`` mentions).
The repository's private keys sit beside it in the state folder: fine for a demo, never for a fleet.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import uvicorn

from appliance.demo.modelgen import build_anomaly, build_detector
from appliance.settings import AppStoreSettings, Settings
from appstore import Fleet, Repository, channels, publish_app, publish_model
from appstore.server import build_app

CHANNEL = "demo"
TOKEN_FILE = "device-token.txt"
REFRESH_S = 5.0  # the demo looks for news every few seconds (a real site: appstore.refresh_s, 60 s)


def repo_dir(settings: Settings) -> Path:
    return settings.state_dir / "appstore-repo"


def write_app_manifest(path: Path, manifest: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def prepare(settings: Settings, apps: list[dict[str, object]]) -> tuple[Repository, str]:
    """The demo repository (made on the first run) and this appliance's device token."""
    folder = repo_dir(settings)
    token_file = folder / TOKEN_FILE
    if token_file.exists():
        return Repository(folder), token_file.read_text(encoding="utf-8").strip()
    repo, _ = Repository.create(folder)
    work = settings.state_dir / "demo-models"
    for build, name in ((build_detector, "demo-detector"), (build_anomaly, "demo-gas-anomaly")):
        publish_model(repo, build(work / name))
    for manifest in apps:
        publish_app(repo, write_app_manifest(work / f"{manifest['name']}.json", manifest))
    fleet = Fleet(repo.layout.fleet_db)
    channels.set_apps(repo, fleet, CHANNEL, {str(m["name"]): str(m["version"]) for m in apps})
    token = fleet.add_device(settings.device_id, channel=CHANNEL)
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n", encoding="utf-8")
    return repo, token


def serve(repo: Repository) -> tuple[uvicorn.Server, str]:
    """The AppStore on a free loopback port, on a thread of its own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(build_app(repo.layout.folder), log_level="warning", lifespan="off",
                                           server_header=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo-appstore", daemon=True).start()
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}/"


def link(settings: Settings, url: str, token: str) -> Settings:
    """``settings`` with the AppStore link of the demo."""
    root = repo_dir(settings) / "metadata" / "1.root.json"
    store = AppStoreSettings(url=url, root=root, channel=CHANNEL, device_token=token, refresh_s=REFRESH_S)
    return settings.model_copy(update={"appstore": store})


def link_environ(settings: Settings, url: str, token: str) -> dict[str, str]:
    """The same link as environment overrides, for the daemon the demo's launcher starts."""
    root = repo_dir(settings) / "metadata" / "1.root.json"
    values = {"URL": json.dumps(url), "ROOT": json.dumps(str(root)), "CHANNEL": json.dumps(CHANNEL),
              "DEVICE_TOKEN": json.dumps(token), "REFRESH_S": str(REFRESH_S)}
    return {f"APPLIANCE_APPSTORE__{k}": v for k, v in values.items()}


def environ_repo(settings: Settings) -> dict[str, str]:
    """What ``appstore`` commands need to work on the demo's repository."""
    return {**os.environ, "APPSTORE_REPO": str(repo_dir(settings))}
