"""The launcher on its own: boot counting, the deadline, the way back, and a launcher killed at each step.

The releases here are small programs at the seam the project owns, ``releases/{version}/bin/appliance``:
each does what its ``mode`` file says (confirm, crash, hang, ask for a switch) through the same shared
files a real release uses (``appliance_launcher.state``). The launcher and the database are real: the
launcher runs as a subprocess and restores real SQLite files. The real releases are in test_upgrade.py.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance_launcher.state import Layout, Request
from tests.conftest import ROOT, wait_until

RELEASE = textwrap.dedent('''\
    #!{python}
    """A stand-in release: does what releases/<version>/mode says."""
    import os, signal, sqlite3, sys, time
    sys.path.insert(0, {root!r})
    from appliance_launcher.state import Layout, Request, RESTART_EXIT
    layout = Layout.from_env()
    here = os.path.basename(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    mode = open(os.path.join(layout.release(here), "mode")).read().split()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(layout.root / "starts.log", "a") as f:
        f.write(here + "\\n")
    db = sqlite3.connect(layout.root / "appliance.db")
    db.execute("CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, ts REAL NOT NULL, what TEXT)")
    db.execute("INSERT OR IGNORE INTO events VALUES (?, ?, ?)", (here + "-" + os.environ["LAUNCHER_BOOT_ID"],
               time.time(), "written by " + here))
    db.commit()
    if mode[0] == "crash":
        sys.exit(3)
    if mode[0] == "confirm":
        layout.confirm(here, os.environ["LAUNCHER_BOOT_ID"])
    if mode[0] == "switch" and any(h.outcome == "rolled back" and h.to_version == mode[1]
                                   for h in layout.state().history):
        mode = ["stay"]  # as the real agent does: a version taken back is not tried again
    if mode[0] == "switch":
        snap = layout.upgrade / "snapshot.db"
        layout.upgrade.mkdir(exist_ok=True)
        db.execute("VACUUM INTO ?", (str(snap),))
        layout.write_request(Request(version=mode[1], from_version=here, db=str(layout.root / "appliance.db"),
                                     snapshot=str(snap), snapshot_time=time.time()))
        sys.exit(RESTART_EXIT)
    while True:
        time.sleep(0.1)
    ''')


def make_release(root: Path, version: str, mode: str) -> None:
    folder = root / "releases" / version
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    program = folder / "bin" / "appliance"
    program.write_text(RELEASE.format(python=sys.executable, root=str(ROOT)))
    program.chmod(0o755)
    (folder / "mode").write_text(mode)
    (folder / ".installed").write_text("")


class Launcher:
    def __init__(self, root: Path, confirm_within: float = 30.0) -> None:
        self.root = root
        self.layout = Layout(root)
        self.confirm_within = confirm_within
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.root / "launcher.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance_launcher", "--root", str(self.root),
                                          "--tries", "3", "--confirm-within", str(self.confirm_within),
                                          "--stop-grace", "5"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def history(self) -> list[str]:
        path = self.root / "launcher.json"
        return [h["outcome"] for h in json.loads(path.read_text())["history"]] if path.exists() else []

    def starts(self) -> list[str]:
        path = self.root / "starts.log"
        return path.read_text().split() if path.exists() else []

    def current(self) -> str | None:
        return self.layout.target(self.layout.current)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def log(self) -> str:
        return (self.root / "launcher.log").read_text(errors="replace")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    made = Launcher(tmp_path / "box")
    made.root.mkdir()
    make_release(made.root, "1.0.0", "switch 2.0.0")
    made.layout.point(made.layout.current, "1.0.0")
    yield made
    made.stop()


def events(root: Path) -> list[str]:
    with sqlite3.connect(root / "appliance.db") as db:
        return [r[0] for r in db.execute("SELECT what FROM events ORDER BY ts")]


def test_a_release_that_confirms_becomes_current_and_the_old_one_is_kept(launcher: Launcher) -> None:
    make_release(launcher.root, "2.0.0", "confirm")
    launcher.start()
    wait_until(lambda: launcher.history() == ["confirmed"], 30, what="2.0.0 confirmed")
    assert launcher.current() == "2.0.0" and launcher.layout.target(launcher.layout.previous) == "1.0.0"
    assert launcher.starts() == ["1.0.0", "2.0.0"]
    assert launcher.stop() == 0, "SIGTERM stops the release and the launcher"


def test_a_release_that_keeps_crashing_gets_three_starts_then_the_old_one_and_its_database_come_back(
        launcher: Launcher) -> None:
    make_release(launcher.root, "2.0.0", "crash")
    launcher.start()
    wait_until(lambda: launcher.history() == ["rolled back"], 30, what="2.0.0 rolled back")
    wait_until(lambda: len(launcher.starts()) == 5, 10, what="1.0.0 started again")
    assert launcher.starts()[:4] == ["1.0.0", "2.0.0", "2.0.0", "2.0.0"]
    assert launcher.current() == "1.0.0"
    state = json.loads((launcher.root / "launcher.json").read_text())
    assert "did not confirm its health in 3 starts" in state["history"][0]["reason"]
    assert "exited with code 3" in state["history"][0]["reason"]
    assert state["carry"]["version"] == "2.0.0", "what the failed release wrote is kept for the carry-over"
    with sqlite3.connect(state["carry"]["failed_db"]) as failed:
        assert [r[0] for r in failed.execute("SELECT what FROM events")].count("written by 2.0.0") == 3
    assert "written by 2.0.0" not in events(launcher.root), "the database is the snapshot again"
    assert launcher.starts() == ["1.0.0", "2.0.0", "2.0.0", "2.0.0", "1.0.0"], "and 2.0.0 is not tried again"


def test_a_release_that_hangs_is_stopped_at_the_deadline_and_taken_back(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path / "box", confirm_within=5.0)
    launcher.root.mkdir()
    make_release(launcher.root, "1.0.0", "switch 2.0.0")
    make_release(launcher.root, "2.0.0", "hang")
    launcher.layout.point(launcher.layout.current, "1.0.0")
    launcher.start()
    try:
        wait_until(lambda: launcher.history() == ["rolled back"], 30, what="2.0.0 taken back at its deadline")
        assert launcher.current() == "1.0.0"
        state = json.loads((launcher.root / "launcher.json").read_text())
        assert "within 5 s" in state["history"][0]["reason"] and state["trial"] is None
    finally:
        launcher.stop()


@pytest.mark.parametrize("step", ["trial recorded, not switched", "switched, not started", "taking back"])
def test_a_launcher_killed_at_a_step_finishes_it_when_started_again(launcher: Launcher, step: str) -> None:
    """The state a kill leaves at each step, made by running the launcher up to it, then a new launcher."""
    make_release(launcher.root, "2.0.0", "confirm" if step != "taking back" else "crash")
    layout = launcher.layout
    snap = layout.upgrade / "snapshot.db"
    layout.upgrade.mkdir()
    sqlite3.connect(snap).execute("CREATE TABLE events (id TEXT PRIMARY KEY, ts REAL NOT NULL, what TEXT)").connection.commit()
    from appliance_launcher.launcher import Launcher as Loop
    from appliance_launcher.launcher import Options

    loop = Loop(Options(root=launcher.root, config=None))
    layout.write_request(Request(version="2.0.0", from_version="1.0.0", db=str(launcher.root / "appliance.db"),
                                 snapshot=str(snap), snapshot_time=0.0))
    state = layout.state()
    if step == "trial recorded, not switched":
        # what _follow_request saved before it touched the links
        loop._follow_request(state, "1.0.0")
        layout.point(layout.current, "1.0.0")
        layout.point(layout.previous, None)
    elif step == "switched, not started":
        loop._follow_request(state, "1.0.0")
    else:
        loop._follow_request(state, "1.0.0")
        state = layout.state()
        assert state.trial is not None
        state.trial.tries = 3
        layout.save(state)
        sqlite3.connect(launcher.root / "appliance.db").execute("CREATE TABLE t (x)").connection.commit()
    (launcher.root / "releases" / "1.0.0" / "mode").write_text("stay")  # the test made the request itself
    launcher.start()
    want = "confirmed" if step != "taking back" else "rolled back"
    wait_until(lambda: launcher.history() == [want], 30, what=f"the launcher finishing: {want}")
    assert launcher.current() == ("2.0.0" if want == "confirmed" else "1.0.0")
    wait_until(lambda: launcher.starts(), 10, what="a release started")
    if want == "rolled back":
        with sqlite3.connect(launcher.root / "appliance.db") as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert "t" not in tables, "the snapshot is back in place"


def test_a_request_naming_a_path_outside_the_releases_is_not_followed(launcher: Launcher) -> None:
    """Whoever can write the request file still cannot make the launcher run a program outside releases/."""
    evil = launcher.root / "evil"
    make_release(launcher.root, "1.0.0", "stay")
    (evil / "bin").mkdir(parents=True)
    (evil / ".installed").write_text("")
    launcher.layout.write_request(Request(version="../evil", from_version="1.0.0", db="x", snapshot=None))
    loop_state = launcher.layout.state()
    from appliance_launcher.launcher import Launcher as Loop
    from appliance_launcher.launcher import Options

    Loop(Options(root=launcher.root, config=None))._follow_request(loop_state, "1.0.0")
    assert launcher.current() == "1.0.0" and launcher.layout.state().trial is None
    assert not launcher.layout.installed("../evil") and not launcher.layout.installed("..")
