"""Who runs the managed Mosquitto, and how its log lines reach the daemon: ``broker.supervisor``.

- ``daemon`` (the default): :class:`ChildMosquitto`, a child of the daemon that logs to a pipe, restarted with
  backoff when it dies and dying with the daemon.
- ``systemd`` (the OS image): :class:`UnitMosquitto`, Mosquitto under ``appliance-broker.service`` (its own
  sandbox: it sees the broker's files and nothing else of the state), started by ``appliance-broker.path`` once
  the daemon has written its files and at once again whenever it ends. It logs to a file in its runtime
  folder (``broker.run_dir``, in memory), which the daemon follows as ``tail -F`` does and keeps short: past
  ``ROTATE_BYTES`` it renames the file and sends SIGHUP, on which Mosquitto opens a new one. It writes its pid
  there too, so the daemon (the same user) can send it SIGHUP to reload and SIGTERM to restart it. The
  broker outlives the daemon's restarts, and with it the devices' connections.

Both pass every line to ``on_line`` and say when Mosquitto runs (its "mosquitto version ... running" line,
logged once every listener is open).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from appliance.devices.mosquitto import BrokerFiles
from appliance.errors import ApplianceError
from common.backoff import Backoff
from common.process import die_with_parent

log = logging.getLogger("appliance.mosquitto")

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
STAYED_UP_S = 5.0
ROTATE_BYTES = 8 * 2**20  # the followed log is renamed and reopened past this (it is in memory: /run)
FOLLOW_EVERY_S = 0.1  # how often the follower looks for new lines at the end of the file
UNIT = "appliance-broker.service"


class ManagedBrokerError(ApplianceError):
    pass


def runs(line: str) -> bool:
    """Mosquitto's line once every listener is open."""
    return line.startswith("mosquitto version") and line.endswith(" running")


def process_of(pid_file: Path, config: Path) -> int | None:
    """The pid in ``pid_file`` if that process is a Mosquitto run from ``config`` (not a reused pid)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(config).encode() in cmdline else None


class MosquittoProcess(Protocol):
    def prepare(self) -> None:
        """Before the files are first written: what must be in place to see Mosquitto take them."""

    def start(self) -> None:
        """Returns once Mosquitto runs with the files; raises ManagedBrokerError."""

    def pid(self) -> int | None: ...

    def restart(self) -> None:
        """Ends Mosquitto and returns once a new one runs (or logs why not)."""

    def stop(self) -> None: ...


class ChildMosquitto:
    """Mosquitto as the daemon's child: its output on a pipe, started again with backoff when it ends, killed
    when the thread that started it ends (the daemon)."""

    def __init__(self, exe: str, files: BrokerFiles, on_line: Callable[[str], None]) -> None:
        self._exe, self.files, self._on_line = exe, files, on_line
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()  # guards _proc
        self._stopping = threading.Event()
        self._restart = threading.Event()  # the supervisor starts the next Mosquitto at once
        self._started = threading.Event()  # set by the supervisor each time a Mosquitto listens
        self._running = threading.Event()  # the current child logged that it runs
        self._thread: threading.Thread | None = None
        self._first_start_error = ""

    def prepare(self) -> None:
        """A Mosquitto left by a daemon that was killed still holds the ports and the old files: end it."""
        pid = process_of(self.files.pid, self.files.config)
        if pid is None:
            return
        log.warning("ending Mosquitto %s left running by an earlier start", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            self._stopping.wait(0.05)

    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="mosquitto", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._started.wait(0.1):
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                self._stopping.set()
                raise ManagedBrokerError(self._first_start_error or f"Mosquitto did not start within "
                                         f"{START_TIMEOUT_S:.0f} s")

    def restart(self) -> None:
        self._started.clear()
        self._restart.set()
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
        if not self._started.wait(START_TIMEOUT_S):
            log.error("Mosquitto did not come back within %.0f s after a restart", START_TIMEOUT_S)

    def _supervise(self) -> None:
        """Starts Mosquitto and starts it again when it ends; in this thread, which lives as long as the
        broker should, since the child dies with the thread that started it."""
        backoff, failures, first = Backoff(base_s=0.5, max_s=30.0), 0, True
        while not self._stopping.is_set():
            proc = self._spawn()
            if proc is None:
                return
            if self._listening(proc):
                self._started.set()
            elif first:
                self._first_start_error = (f"Mosquitto exited at start (code {proc.poll()}); its log lines above say "
                                           f"why (configuration {self.files.config})")
                return
            first = False
            up = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            if self._restart.is_set():
                self._restart.clear()
                continue
            failures = 1 if time.monotonic() - up > STAYED_UP_S else failures + 1
            delay = backoff.delay(failures)
            log.error("Mosquitto exited (code %s); starting it again in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return

    def _spawn(self) -> subprocess.Popen[str] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._running.clear()
            self._proc = subprocess.Popen(
                [self._exe, "-c", str(self.files.config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", preexec_fn=die_with_parent)  # noqa: PLW1509 (die with this thread)
            proc = self._proc
        self.files.pid.write_text(f"{proc.pid}\n")
        threading.Thread(target=self._read, args=(proc,), name="mosquitto-log", daemon=True).start()
        return proc

    def _listening(self, proc: subprocess.Popen[str]) -> bool:
        """Mosquitto says "running" once every listener is open (our own child's line, so not a stale one)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            if self._running.wait(0.05):
                return proc.poll() is None
            if proc.poll() is not None:
                return False
        return False

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if line := raw.rstrip():
                if runs(line):
                    self._running.set()
                self._on_line(line)
        proc.stdout.close()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)


class UnitMosquitto:
    """Mosquitto run by systemd (see the module's docstring): the daemon follows its log file and signals it.

    Its pid comes from its pid file, read when its log says it starts (it writes the file just before) and once
    when the daemon starts; the daemon cannot check it against ``/proc``, which hides the other unit's processes
    (``ProtectProc=invisible``), so a pid file left by a Mosquitto that crashed and was not started again could
    name a reused pid of the same user until the next start (systemd starts it again at once)."""

    def __init__(self, files: BrokerFiles, run_dir: Path, on_line: Callable[[str], None]) -> None:
        self.files, self._on_line = files, on_line
        self.log_file, self.pid_file = run_dir / "mosquitto.log", run_dir / "mosquitto.pid"
        self._stopping = threading.Event()
        self._running = threading.Event()  # a Mosquitto logged that it runs since the last restart
        self._thread: threading.Thread | None = None
        self._ran_before = False  # a Mosquitto ran when this daemon started
        self._pid: int | None = None

    def prepare(self) -> None:
        """Follow the log from its end: what the files' first writing makes Mosquitto say comes next."""
        self._running.clear()
        self._pid = self._read_pid()
        self._ran_before = self.pid() is not None
        opened = self._open(at_end=True)
        self._thread = threading.Thread(target=self._follow, args=(opened,), name="mosquitto-log", daemon=True)
        self._thread.start()

    def pid(self) -> int | None:
        pid = self._pid
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except OSError:  # gone, or not this user's
            return None
        return pid

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _line(self, line: str) -> None:
        if line.startswith("mosquitto version"):
            if line.endswith(" starting"):  # its pid file is written
                self._pid = self._read_pid()
            elif line.endswith(" terminating"):
                self._pid = None
            elif runs(line):
                self._running.set()
        self._on_line(line)

    def start(self) -> None:
        if self._ran_before and self.pid() is not None:
            return  # it ran before this daemon started, and has just reloaded the files (or been restarted)
        if not self._running.wait(START_TIMEOUT_S):
            raise ManagedBrokerError(
                f"Mosquitto ({UNIT}, started by appliance-broker.path once {self.files.config} exists) did not "
                f"start within {START_TIMEOUT_S:.0f} s: see journalctl -u {UNIT}, and that appliance-broker.path "
                "is enabled")

    def restart(self) -> None:
        pid = self.pid()
        self._running.clear()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # appliance-broker.path starts it again at once
        if not self._running.wait(START_TIMEOUT_S):
            log.error("Mosquitto did not come back within %.0f s after a restart: see journalctl -u %s",
                      START_TIMEOUT_S, UNIT)

    def stop(self) -> None:
        """The broker stays up with its unit (and the devices connected) while the daemon is away."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

    def _open(self, at_end: bool) -> IO[str] | None:
        try:
            f = open(self.log_file, encoding="utf-8", errors="replace")  # noqa: SIM115 - the follower closes it
        except OSError:
            return None
        if at_end:
            f.seek(0, os.SEEK_END)
        return f

    def _follow(self, f: IO[str] | None) -> None:
        """``tail -F``: a file renamed (our rotation) or removed (Mosquitto restarted: its runtime folder goes
        with it) is read to its end, and the next one from its start once it exists; by then the Mosquitto
        that wrote the old one has closed it, so no line is lost between them."""
        partial, rotated = "", False
        while not self._stopping.is_set():
            if f is None:
                f = self._open(at_end=False)
                if f is None:
                    self._stopping.wait(FOLLOW_EVERY_S)
                    continue
            chunk = f.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    if line := partial.rstrip():
                        self._line(line)
                    partial = ""
                continue
            if self._replaced(f):
                rest = f.read()  # written before the old file was closed
                for line in (partial + rest).splitlines():
                    if line.strip():
                        self._line(line.rstrip())
                partial = ""
                f.close()
                f, rotated = None, False
                with contextlib.suppress(OSError):
                    self.log_file.with_name(self.log_file.name + ".1").unlink()
                continue
            if f.tell() > ROTATE_BYTES and not rotated:
                rotated = self._rotate()
            self._stopping.wait(FOLLOW_EVERY_S)
        if f is not None:
            f.close()

    def _replaced(self, f: IO[str]) -> bool:
        """A new file is at the log's path (the one ``f`` reads was renamed or removed)."""
        try:
            return os.stat(self.log_file).st_ino != os.fstat(f.fileno()).st_ino
        except OSError:
            return False  # no file there yet: Mosquitto is between its old file and its new one

    def _rotate(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            self.log_file.rename(self.log_file.with_name(self.log_file.name + ".1"))
            os.kill(pid, signal.SIGHUP)  # Mosquitto reopens its log file when it reloads
        except OSError as e:
            log.warning("could not rotate Mosquitto's log %s: %s", self.log_file, e)
            return False
        return True
