"""The real HTTP server (FastAPI app under uvicorn, in a thread) on loopback, over a real SQLite store.

For API tests that need data the daemon would take long to make (apps with two versions, events with
snapshots, many users); the daemon itself is tested as a subprocess in test_console_e2e.py. The
daemon's status comes through the ``status`` callable, the seam the daemon itself fills.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from appliance.auth import Accounts, Actor, LoginLimiter, LoginLimits, ScryptParams
from appliance.console.install import install_console
from appliance.http.context import Console
from appliance.http.security import CSRF_HEADER
from appliance.http.server import build_app
from appliance.metrics import Metrics
from appliance.stats import Stats
from appliance.status import AppStatus, BrokerStatus, DaemonStatus, Health
from appliance.store import Role, Store
from tests.conftest import wait_until

FAST_SCRYPT = ScryptParams(log2_n=12)  # 4 MiB per hash: the tests hash hundreds of times
LOCAL = Actor("test", "local")


def fake_status() -> DaemonStatus:
    return DaemonStatus(
        device="test", version="0.0.0", uptime_s=1.0, health=Health(ok=True),
        broker=BrokerStatus(mode="embedded", host="127.0.0.1", port=1883, protocol="3.1.1", connected=True),
        apps=(AppStatus(name="ppe-watch", version="1.0.0", model="demo-detector@1.0.0", partition="cpu",
                        sources=("cameras/+/frame",), state="serving", reason="", swap="", events=0),))


@dataclass
class ApiServer:
    state_dir: Path
    host: str = "127.0.0.1"
    limits: LoginLimits = field(default_factory=LoginLimits)
    status: Callable[[], DaemonStatus] = fake_status
    secure_cookies: bool = False
    store: Store = field(init=False)
    accounts: Accounts = field(init=False)
    port: int = field(init=False)
    passwords: dict[str, str] = field(default_factory=dict)
    stats: Stats = field(default_factory=lambda: Stats(30.0))  # cameras' latest frames, sensors' trends

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "appliance.db")
        self.accounts = Accounts(self.store, scrypt=FAST_SCRYPT, limiter=LoginLimiter(self.limits))
        console = Console(self.store, self.accounts, self.state_dir / "snapshots", self.status, self.secure_cookies,
                          stats=self.stats)
        self.app = build_app(self.status, Metrics(self.stats, list), lambda: (True, ""), console,
                             pages=install_console)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        self.port = int(sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                                    access_log=False, proxy_headers=False,
                                                    server_header=False))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        wait_until(lambda: self.server.started, 10, what="the API server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_user(self, name: str, role: Role, password: str | None = None) -> str:
        password = password or f"pass phrase {len(self.passwords)} for the tests"
        self.accounts.add_user(name, role, password, LOCAL)
        self.passwords[name] = password
        return password

    def client(self, local_address: str | None = None) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
        return httpx.Client(base_url=self.url, timeout=30, transport=transport)

    def login(self, name: str, local_address: str | None = None) -> httpx.Client:
        """A client logged in as ``name``, sending the session's CSRF token with every request."""
        c = self.client(local_address)
        r = c.post("/api/v1/login", json={"user": name, "password": self.passwords[name]})
        assert r.status_code == 200, r.text
        c.headers[CSRF_HEADER] = r.json()["csrf_token"]
        return c

    def token_client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {token}"})

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.store.close()
