"""Real releases of this tree, a real AppStore serving them, and boxes that run them under the real launcher.

Releases are built once per session with the project's own builder (``image.bundle``): the tree as it
is (0.1.0), the tree with its version bumped (a good upgrade), and copies sabotaged the ways releases go
wrong in the field. Every release shares the dependency wheels byte for byte, as two builds from one
environment do. A box is a launcher root with the base release installed the way the image installs it,
a settings file, and ``python -m appliance_launcher`` as a subprocess; the daemon under it runs from its
release's own environment, never from this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from appliance.upgrade.install import install_bundle
from appliance_launcher.state import Layout
from appstore.server import build_app
from common import crashpoint
from image import bundle
from tests.conftest import ROOT, free_port, wait_until
from tests.test_appstore import ok
from tests.test_sync import serve, write_app

BASE = "0.1.0"
GOOD = "0.2.0"

Sabotage = Callable[[Path], None]


def _replace(tree: Path, file: str, old: str, new: str) -> None:
    path = tree / file
    text = path.read_text()
    assert old in text, f"{file} no longer holds {old!r}: update the sabotage"
    path.write_text(text.replace(old, new, 1))


def crashes_at_start(tree: Path) -> None:
    _replace(tree, "appliance/app.py", "        s = self.settings\n        self._loop = asyncio.get_running_loop()\n",
             "        raise RuntimeError('sabotaged: this release crashes at start')\n")


def never_healthy(tree: Path) -> None:
    _replace(tree, "appliance/app.py", "        problems = []\n        if self.broker",
             "        problems = ['sabotaged: never healthy']\n        if self.broker")


def migration_fails(tree: Path) -> None:
    _replace(tree, "appliance/store/migrations.py", "SCHEMA_VERSION = MIGRATIONS[-1].version",
             "MIGRATIONS += (Migration(len(MIGRATIONS) + 1, 'CREATE TABLE broken (', 'sabotaged'),)\n"
             "SCHEMA_VERSION = MIGRATIONS[-1].version")


def cannot_phone_home(tree: Path) -> None:
    _replace(tree, "appstore_client/client.py", 'self.url = url.rstrip("/") + "/"',
             'self.url = "http://127.0.0.1:9/"  # sabotaged: the AppStore is never reached')


RELEASES: dict[str, Sabotage | None] = {
    BASE: None, GOOD: None, "0.2.1": crashes_at_start, "0.2.2": never_healthy, "0.2.3": migration_fails,
    "0.2.4": cannot_phone_home,
    "0.2.5": None, "0.2.6": None,  # tampered with on the server: 0.2.5's wheel, 0.2.6's manifest
}


def build_releases(folder: Path) -> dict[str, Path]:
    """Every test release, built from copies of this tree (two at a time: each build waits on pip); version ->
    its release folder."""
    bundle.dependency_wheels(ROOT / "pyproject.toml")  # fetched once, before the builds share the wheelhouse

    def one(version: str) -> Path:
        tree = bundle.copy_tree(ROOT, folder / f"src-{version}")
        bundle.set_version(tree, version)
        sabotage = RELEASES[version]
        if sabotage is not None:
            sabotage(tree)
        try:
            return bundle.build(folder / "dist", source=tree)
        finally:
            shutil.rmtree(tree)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(RELEASES, pool.map(one, RELEASES)))


class Switch:
    """The AppStore's address, serving whichever app is behind it now: the genuine AppStore, or one an
    attacker put in its place (a hijacked name or a stolen server: its own keys, the same URL)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@dataclass
class Shop:
    repo: Path
    url: str
    root: Path
    admin: str
    server: Any
    releases: dict[str, Path]
    switch: Switch

    def fleet(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/devices", headers={"Authorization": f"Bearer {self.admin}"}, timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def device(self, device: str) -> dict[str, Any] | None:
        return next((d for d in self.fleet()["devices"] if d["id"] == device), None)

    def target_file(self, path: str) -> Path:
        folder, _, name = path.rpartition("/")
        [found] = (self.repo / "targets" / folder).glob(f"*.{name}")
        return found


def make_shop(folder: Path, models: dict[str, Path], releases: dict[str, Path]) -> Shop:
    repo = folder / "appstore"
    ok(repo, "keys", "init")
    ok(repo, "publish", "model", str(models["demo-detector"]))
    ok(repo, "publish", "app", str(write_app(folder / "app-1.0.0.json")))
    for release in releases.values():
        ok(repo, "publish", "release", str(release))
    admin = ok(repo, "admin-token").strip().splitlines()[-1]
    switch = Switch(build_app(repo))
    server, port = serve(switch)
    root = folder / "root.json"
    shutil.copy(repo / "metadata" / "1.root.json", root)
    return Shop(repo, f"http://127.0.0.1:{port}", root, admin, server, releases, switch)


@dataclass
class Box:
    """An appliance as a site has it: the launcher, its root, the base release, settings; a real broker."""

    root: Path
    config: Path
    http_port: int
    mqtt_port: int
    device: str
    tries: int = 3
    confirm_within_s: float = 90.0
    crashpoints: Path | None = None  # armed steps: see common.crashpoint
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.root.parent / f"box-{self.device}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance_launcher", "--root", str(self.root), "--config", str(self.config),
                 "--tries", str(self.tries), "--confirm-within", str(self.confirm_within_s), "--stop-grace", "20",
                 "--restart-delay", "0.2"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, **({crashpoint.ENV: str(self.crashpoints)} if self.crashpoints else {})))

    def arm(self, *steps: str) -> None:
        """Kill the process that reaches each of ``steps`` next (once each; the box must be made with
        ``crashpoints``)."""
        assert self.crashpoints is not None
        for step in steps:
            (self.crashpoints / step).touch()

    def armed(self) -> list[str]:
        return sorted(p.name for p in self.crashpoints.iterdir()) if self.crashpoints else []

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/status", timeout=5) as r:
                result: dict[str, Any] = json.load(r)
                return result
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def running(self, version: str) -> dict[str, Any] | None:
        """The status, once the daemon of ``version`` answers healthy."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the launcher exited with {self.proc.returncode}:\n{self.log()}")
        s = self.status()
        return s if s and s["version"] == version and s["health"]["ok"] else None

    def wait_running(self, version: str, timeout: float = 120.0) -> dict[str, Any]:
        result: dict[str, Any] = wait_until(lambda: self.running(version), timeout, interval=0.2,
                                            what=f"{self.device} running {version} (log: {self.log_path})")
        return result

    def upgrade(self) -> dict[str, Any]:
        s = self.status()
        return s["upgrade"] if s else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def history(self) -> list[dict[str, Any]]:
        data = json.loads((self.root / "launcher.json").read_text()) if (self.root / "launcher.json").exists() else {}
        result: list[dict[str, Any]] = data.get("history", [])
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill_launcher(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


def make_box(folder: Path, shop: Shop, channel: str, mqtt_port: int, uv_cache: Path, group: str = "",
             window: str = "", **options: Any) -> Box:
    """A registered box on ``channel`` with the base release installed (not started)."""
    http_port = free_port()
    device = f"box-{http_port}"
    root = folder / device
    install_bundle(Layout(root), shop.releases[BASE], cache_dir=uv_cache)
    token = ok(shop.repo, "devices", "add", device, "--channel", channel).strip().splitlines()[-1]
    config = folder / f"{device}.toml"
    config.write_text(textwrap.dedent(f"""\
        device_id = "{device}"
        state_dir = "{root}"
        [broker]
        mode = "external"
        port = {mqtt_port}
        reconnect_min_s = 0.2
        reconnect_max_s = 1.0
        [http]
        port = {http_port}
        [outputs]
        results = true
        [appstore]
        url = "{shop.url}/"
        root = "{shop.root}"
        channel = "{channel}"
        group = "{group}"
        device_token = "{token}"
        refresh_s = 600
        [upgrade]
        cache_dir = "{uv_cache}"
        window = "{window}"
        """))
    if options.pop("crashpoints", False):
        options["crashpoints"] = folder / "crashpoints"
        options["crashpoints"].mkdir()
    return Box(root, config, http_port, mqtt_port, device, **options)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    return wait_until(predicate, timeout, interval=0.2, what=what)
