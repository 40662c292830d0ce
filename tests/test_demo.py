"""`make demo` runs `appliance demo`: it must show events within 10 seconds and stop cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_demo_shows_events_within_ten_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "APPLIANCE_STATE_DIR": str(tmp_path / "state"), "APPLIANCE_HTTP__PORT": str(free_port()),
           "APPLIANCE_BROKER__PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "demo"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    started = None
    seen = set()
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Demo running" in line:
                started = time.monotonic()
            if line.startswith("EVENT"):
                seen.add(line.split()[1])
                assert started is not None
                assert time.monotonic() - started < 10, "events within 10 seconds of the start"
                if {"ppe-watch", "gas-watch"} <= seen or time.monotonic() - started > 30:
                    break
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        lines.append(out)
    text = "".join(lines)
    assert started is not None, text
    assert "ppe-watch" in seen, f"no camera event:\n{text}"
    assert "gas-watch" in seen, f"no gas event:\n{text}"
    assert proc.returncode == 0 and "appliance stopped" in text
    assert "Traceback" not in text and "ERROR" not in text, text
