"""What the HTTP server needs from the daemon, in one object: the store, accounts, status, live feed.

The daemon builds one :class:`Console` and hands it to :func:`appliance.http.server.build_app`, which
keeps it as ``app.state.console``; routes and console pages reach it with
:func:`appliance.http.security.console`. It lives apart from the security module (users and CSRF), and
imports nothing from the console pages, so the import arrows point one way: console -> http.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.auth import Accounts
from appliance.devices.registry import Registry
from appliance.http.live import LiveFeed
from appliance.samples.capture import SampleCapture
from appliance.stats import Stats
from appliance.status import DaemonStatus
from appliance.store import Store
from appliance.upgrade.agent import Upgrader


@dataclass(slots=True)
class Console:
    """What the API and the console pages need from the daemon; ``app.state.console``."""

    store: Store
    accounts: Accounts
    snapshots_dir: Path  # event snapshots are served from here and from nowhere else
    status: Callable[[], DaemonStatus]
    secure_cookies: bool  # the server runs under TLS: cookies are marked Secure
    stats: Stats | None = None  # cameras' latest frames and sensors' trends, for the console's Sources page
    live: LiveFeed = field(default_factory=LiveFeed)  # new events, for the console's live alert list
    diagnostics: Callable[[], bytes] | None = None  # the support bundle (a zip), see appliance.console.diagnostics
    sync_now: Callable[[], None] = lambda: None  # nudge the AppStore sync (after a subscription changed)
    samples: SampleCapture | None = None  # operators' flags become hard samples
    upgrades: Upgrader | None = None  # the appliance's own upgrades (None without an AppStore link)
    devices: Registry | None = None  # cameras' and sensors' credentials for the managed broker
