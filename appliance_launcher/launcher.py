"""The launcher's loop: start ``current``, count the boots of a release on trial, take back one that fails.

A release on trial gets ``tries`` starts to write its confirmation (``upgrade/confirm.json`` naming the boot
id it was started with) and, on each start, ``confirm_within_s`` seconds to do it. A start that exits
before confirming counts one failed try; a start that does not confirm in time is stopped and the release
is taken back at once (it runs, but it is not healthy: waiting longer would not help). Taking back means:
the failed release's database is moved aside, the snapshot taken before the switch is put in its place,
``current`` points at the release it came from again, and the state records why and what to carry over.
Every step is recorded in ``launcher.json`` before the next one starts, so a launcher killed at any
point, started again, finishes what it was doing: the box always comes up on a release with its data.

A confirmed release that exits is started again after a backoff, as systemd's ``Restart=on-failure``
would; exit code ``RESTART_EXIT`` with a request switches releases, without one it just restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from appliance_launcher.state import (
    BOOT_ENV,
    RESTART_EXIT,
    ROOT_ENV,
    Carry,
    LauncherState,
    Layout,
    StateError,
    Trial,
)
from common import crashpoint
from common.backoff import Backoff
from common.files import fsync_dir
from common.process import die_with_parent

log = logging.getLogger("appliance-launcher")

POLL_S = 0.2  # how often the launcher looks at its child and the confirmation


RESTART_MAX_S = 30.0  # the longest wait before starting a crashing release again


@dataclass(frozen=True, slots=True)
class Options:
    root: Path
    config: Path | None
    tries: int = 3  # starts a release on trial gets to confirm its health
    confirm_within_s: float = 180.0  # seconds after each start
    stop_grace_s: float = 30.0  # seconds a release gets to stop after SIGTERM before SIGKILL
    restart: Backoff = field(default_factory=lambda: Backoff(base_s=1.0, max_s=RESTART_MAX_S, jitter=0.0))  # a confirmed release that exits


class NoRelease(Exception):
    """Nothing to start: ``current`` is missing or points at a release that is not installed."""


class Launcher:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.layout = Layout(options.root)
        self._stopping = False
        self._child: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop the release and return from :meth:`run` (the SIGTERM handler)."""
        self._stopping = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        self._end_orphan()
        crashes = 0
        while not self._stopping:
            state = self.layout.state()
            trial = state.trial
            if trial is not None and trial.tries >= self.o.tries:
                self._take_back(state, f"{trial.version} did not confirm its health in {trial.tries} starts "
                                       f"(last: {trial.last_failure or 'unknown'})")
                continue
            if trial is not None and self.layout.target(self.layout.current) != trial.version:
                # killed between recording the trial and switching: finish the switch
                self.layout.point(self.layout.previous, trial.from_version)
                self.layout.point(self.layout.current, trial.version)
            version = self.layout.target(self.layout.current)
            if version is None or not self.layout.installed(version):
                raise NoRelease(f"{self.layout.current} does not point at an installed release "
                                f"(installed: {', '.join(self.layout.installed_versions()) or 'none'}); install "
                                "one with `appliance upgrade install BUNDLE --root ROOT`")
            if trial is not None:
                trial.tries += 1
                self.layout.save(state)
            self.layout.request_file.unlink(missing_ok=True)  # only a request made by this start counts
            boot = uuid.uuid4().hex
            started = time.monotonic()
            code, timed_out = self._run_once(version, boot, trial)
            if self._stopping:
                break
            state = self.layout.state()
            if state.trial is not None and timed_out:
                self._take_back(state, f"{version} did not confirm its health within {self.o.confirm_within_s:g} s "
                                       "of its start")
                continue
            if state.trial is not None:
                state.trial.last_failure = f"exited with code {code} before confirming its health"
                log.warning("release %s on trial %s", version, state.trial.last_failure)
                self.layout.save(state)
                continue
            if code == RESTART_EXIT:
                crashes = 0
                self._follow_request(state, version)
                continue
            crashes = crashes + 1 if time.monotonic() - started < 60 else 1
            delay = self.o.restart.delay(crashes)
            log.error("release %s exited with code %s; starting it again in %.0f s", version, code, delay)
            self._sleep(delay)
        return 0

    # one start

    def _run_once(self, version: str, boot: str, trial: Trial | None) -> tuple[int, bool]:
        """Start ``current`` and watch it; the exit code, and whether it was stopped for not confirming."""
        env = dict(os.environ, **{ROOT_ENV: str(self.layout.root), BOOT_ENV: boot})
        program = self.layout.current / "bin" / "appliance"
        args = [str(program), "run"] + (["--config", str(self.o.config)] if self.o.config else [])
        log.info("starting appliance %s%s", version, f" (on trial, start {trial.tries} of {self.o.tries})"
                 if trial else "")
        # the launcher has one thread, so preexec_fn is safe here
        self._child = subprocess.Popen(args, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509
        self.layout.child_file.write_text(str(self._child.pid))
        deadline = time.monotonic() + self.o.confirm_within_s
        try:
            while True:
                try:
                    return self._child.wait(POLL_S), False
                except subprocess.TimeoutExpired:
                    pass
                if self._stopping:  # asked to stop while this release was starting
                    return self._end_child(), False
                if trial is None:
                    continue
                c = self.layout.confirmation()
                if c is not None and c.version == version and c.boot == boot:
                    self._confirmed(version)
                    trial = None
                elif time.monotonic() > deadline:
                    log.error("release %s did not confirm its health within %g s; stopping it", version,
                              self.o.confirm_within_s)
                    return self._end_child(), True
        finally:
            self.layout.child_file.unlink(missing_ok=True)
            self._child = None

    def _end_child(self) -> int:
        assert self._child is not None
        self._child.send_signal(signal.SIGTERM)
        try:
            return self._child.wait(self.o.stop_grace_s)
        except subprocess.TimeoutExpired:
            self._child.kill()
            return self._child.wait()

    def _end_orphan(self) -> None:
        """A release left by a launcher that was killed is ended before another one starts on its ports."""
        try:
            pid = int(self.layout.child_file.read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("ended release process %d left by an earlier launcher", pid)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.o.stop_grace_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.layout.child_file.unlink(missing_ok=True)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(min(POLL_S, end - time.monotonic()))

    # switching

    def _confirmed(self, version: str) -> None:
        state = self.layout.state()
        trial = state.trial
        if trial is None or trial.version != version:
            return
        state.trial = None
        state.record(trial.from_version, version, "confirmed", f"healthy after {trial.tries} start(s)")
        self.layout.save(state)
        log.info("release %s confirmed its health; %s is kept to go back to", version, trial.from_version)

    def _follow_request(self, state: LauncherState, running: str) -> None:
        request = self.layout.request()
        self.layout.request_file.unlink(missing_ok=True)
        if request is None:
            log.info("release %s asked for a restart", running)
            return
        if not self.layout.installed(request.version):
            log.error("release %s asked to switch to %s, which is not installed; starting %s again", running,
                      request.version, running)
            return
        if request.rollback:
            if request.snapshot:
                state.carry = _restore(Path(request.db), Path(request.snapshot), request.snapshot_time,
                                       self.layout.upgrade, running)
            self.layout.point(self.layout.current, request.version)
            self.layout.point(self.layout.previous, running)
            state.record(running, request.version, "rollback", request.reason or "asked by an admin")
            self.layout.save(state)
            log.warning("back to release %s on an admin's request (from %s)", request.version, running)
            return
        state.trial = Trial(version=request.version, from_version=running,
                            previous_before=self.layout.target(self.layout.previous), db=request.db,
                            snapshot=request.snapshot, snapshot_time=request.snapshot_time,
                            appstore_reachable=request.appstore_reachable, serving_apps=list(request.serving_apps))
        self.layout.save(state)  # first: a launcher killed between here and the switch still knows the way back
        crashpoint.reached("launcher.switch")
        self.layout.confirm_file.unlink(missing_ok=True)
        (self.layout.upgrade / f"failed-{request.version}.db").unlink(missing_ok=True)  # from an earlier try
        self.layout.point(self.layout.previous, running)
        self.layout.point(self.layout.current, request.version)
        log.info("switched to release %s (from %s); it must confirm its health within %g s, %d starts at most",
                 request.version, running, self.o.confirm_within_s, self.o.tries)

    def _take_back(self, state: LauncherState, reason: str) -> None:
        trial = state.trial
        assert trial is not None
        log.error("taking back release %s: %s", trial.version, reason)
        if trial.snapshot:
            state.carry = _restore(Path(trial.db), Path(trial.snapshot), trial.snapshot_time, self.layout.upgrade,
                                   trial.version)
        self.layout.point(self.layout.current, trial.from_version)
        self.layout.point(self.layout.previous, trial.previous_before)
        state.trial = None
        state.record(trial.from_version, trial.version, "rolled back", reason)
        self.layout.save(state)
        log.warning("back on release %s; %s is not started again until the AppStore asks for another version",
                    trial.from_version, trial.version)


def _restore(db: Path, snapshot: Path, since: float, folder: Path, failed: str) -> Carry:
    """Put ``snapshot`` in place of ``db``; the database it replaces is kept for the carry-over.

    Safe to repeat after a crash: the failed database is moved aside by one rename (with its WAL, which
    SQLite names after it), and the snapshot goes in by a copy under a temporary name and a rename.
    """
    folder.mkdir(parents=True, exist_ok=True)
    failed_db = folder / f"failed-{failed}.db"
    if db.exists() and not failed_db.exists():
        for suffix in ("-wal", "-shm", ""):
            src = db.with_name(db.name + suffix)
            if src.exists():
                os.replace(src, failed_db.with_name(failed_db.name + suffix))
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    if not db.exists():
        tmp = db.with_name(f".{db.name}.restore")
        shutil.copyfile(snapshot, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
        fsync_dir(db.parent)
    return Carry(failed_db=str(failed_db), since=since, version=failed)


def main_loop(options: Options) -> int:
    launcher = Launcher(options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: launcher.stop())
    try:
        return launcher.run()
    except (NoRelease, StateError) as e:
        print(f"appliance-launcher: {e}", file=sys.stderr)
        return 2
