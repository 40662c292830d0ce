"""`make demo` runs `appliance demo`: it must show events within 10 seconds, say how to log in to the console,
take a new version published to its AppStore by itself, and stop cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def test_demo_shows_events_within_ten_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    http_port = free_port()
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_HTTP__PORT": str(http_port),
           "APPLIANCE_BROKER__PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "demo"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    started = None
    seen = set()
    console: tuple[str, str] | None = None
    published = swapped = None
    samples = 0
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Demo running" in line:
                started = time.monotonic()
            found = re.search(r"web console: +(\S+) +log in as user (\S+), password (\S+) ", line)
            if found:
                url, user, password = found.groups()
                assert url == f"http://127.0.0.1:{http_port}/"
                console = (user, password)
                r = httpx.post(f"{url}login", data={"user": user, "password": password}, timeout=30)
                assert r.status_code == 303 and r.headers["location"] == "/", "the printed login works"
            if line.startswith("EVENT") and line.split()[1] not in seen:
                seen.add(line.split()[1])
                assert started is not None
                assert time.monotonic() - started < 10, "each app's first event within 10 seconds of the start"
                if {"ppe-watch", "gas-watch"} <= seen and not published:
                    r = subprocess.run([sys.executable, "-m", "appliance.demo.publish"], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=120, check=False)
                    assert r.returncode == 0 and "published ppe-watch 1.1.0" in r.stdout, r.stderr
                    published = time.monotonic()
            if "AppStore: ppe-watch 1.1.0 is serving" in line:
                swapped = time.monotonic()
                break
            if started is not None and time.monotonic() - started > 90:
                break
        if swapped is not None:
            def inbox() -> int:
                r = subprocess.run([sys.executable, "-m", "appstore.cli", "--repo",
                                    str(tmp_path / "state" / "appstore-repo"), "samples", "--json"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
                return int(json.loads(r.stdout)["total"])
            samples = wait_until(inbox, 60, what="hard samples in the demo AppStore's inbox")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        lines.append(out)
    text = "".join(lines)
    assert started is not None, text
    assert "ppe-watch" in seen, f"no camera event:\n{text}"
    assert "gas-watch" in seen, f"no gas event:\n{text}"
    assert proc.returncode == 0 and "appliance stopped" in text
    assert console is not None, f"the demo says how to log in to the console:\n{text}"
    assert "AppStore:" in text and "appliance.demo.publish" in text, text
    assert published is not None and swapped is not None, f"the published version never served:\n{text}"
    assert swapped - published < 30, "taken by itself within a few syncs"
    assert samples >= 1, "the demo shows samples captured and arriving in the AppStore's inbox"
    assert console[1] in (tmp_path / "state" / "demo-admin-password.txt").read_text()
    assert (tmp_path / "state" / "demo-admin-password.txt").stat().st_mode & 0o077 == 0, "only its owner reads it"
    assert "Traceback" not in text and "ERROR" not in text, text
