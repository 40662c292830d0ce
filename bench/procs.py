"""Processes the benchmarks start and watch: Mosquitto, the daemon, and readings from ``/proc``.

Everything listens on 127.0.0.1 only, on free ports. Every process started here is stopped by its own
``stop()`` (terminate, then kill after a grace period), which the callers run in ``finally`` blocks or
through ``with``::

    with Mosquitto(workdir) as broker, Appliance(workdir, broker_port=broker.port) as daemon:
        daemon.cli("models", "add", str(model_dir))
        daemon.start()
        print(daemon.status()["health"])
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "Appliance",
    "BenchError",
    "CpuMeter",
    "Mosquitto",
    "ProcReading",
    "RssSampler",
    "children",
    "free_port",
    "metric",
    "read_proc",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0  # the daemon or a broker must answer within this
STOP_GRACE_S = 20.0  # after SIGTERM, before SIGKILL
CLI_TIMEOUT_S = 120.0
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run (a process did not start, a deadline passed); the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise BenchError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL; never raises for a process that is already gone."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


# --- /proc ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcReading:
    pid: int
    name: str
    rss_mb: float
    pss_mb: float | None  # proportional set size: shared pages divided among their users (None if unreadable)
    cpu_s: float  # user + system since the process started


def read_proc(pid: int) -> ProcReading | None:
    """Resident memory and CPU time of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    name = stat[stat.index("(") + 1: stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    pss: float | None = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024
                    break
    except OSError:
        pss = None
    return ProcReading(pid, name, rss_pages * PAGE_KB / 1024, pss, cpu)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


class CpuMeter:
    """CPU used while a block runs: by each named process, by this process tree, and by everyone else.

    The machine is shared: ``foreign_percent`` (CPU that neither this process nor its descendants
    used, in % of one core) and ``steal_percent`` (time the hypervisor gave to other guests) say how
    disturbed a measurement was::

        with CpuMeter({"daemon": pid}) as meter:
            ...
        meter.result()  # {"cpu_percent": {"daemon": 12.5, "bench client": 3.1}, "foreign_percent": 0.4, ...}
    """

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self._pids = {**{k: v for k, v in pids.items() if v}, "bench client": os.getpid()}

    def _ours(self) -> dict[int, float]:
        out = {}
        for pid in [os.getpid(), *children(os.getpid())]:
            r = read_proc(pid)
            if r is not None:
                out[pid] = r.cpu_s
        return out

    def __enter__(self) -> Self:
        self._t0 = time.monotonic()
        self._stat0 = _stat_jiffies()
        self._ours0 = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        self._elapsed = time.monotonic() - self._t0
        self._stat1 = _stat_jiffies()
        self._ours1 = self._ours()

    def result(self) -> dict[str, Any]:
        elapsed = max(self._elapsed, 1e-6)
        per = {}
        for role, pid in self._pids.items():
            a, b = self._ours0.get(pid or -1), self._ours1.get(pid or -1)
            if a is not None and b is not None:
                per[role] = round((b - a) / elapsed * 100, 1)
        busy = (self._stat1[0] - self._stat0[0]) / CLOCK_TICKS
        steal = (self._stat1[1] - self._stat0[1]) / CLOCK_TICKS
        ours = sum(self._ours1[p] - self._ours0.get(p, 0.0) for p in self._ours1)
        return {"cpu_percent": per, "foreign_percent": round(max(0.0, busy - steal - ours) / elapsed * 100, 1),
                "steal_percent": round(steal / elapsed * 100, 1)}


class RssSampler:
    """Samples resident memory and CPU time of named processes once per ``interval`` seconds, in a thread.

    ``pids`` is asked at each sample, so processes that appear later (a restarted worker) are followed.
    """

    def __init__(self, pids: Callable[[], dict[str, int]], interval: float = 1.0) -> None:
        self._pids = pids
        self.interval = interval
        self.samples: list[tuple[float, dict[str, ProcReading]]] = []  # (monotonic seconds, role -> reading)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            readings = {}
            for role, pid in self._pids().items():
                r = read_proc(pid)
                if r is not None:
                    readings[role] = r
            self.samples.append((t, readings))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))


# --- Mosquitto -----------------------------------------------------------------------------------


class Mosquitto:
    """A private Mosquitto on a free loopback port, anonymous, no persistence."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("mosquitto") is None:
            raise BenchError("mosquitto is not installed: `apt-get install mosquitto mosquitto-clients`")
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # as root, mosquitto switches to its own user, which may not read files in private folders
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             "max_queued_messages 1000\nset_tcp_nodelay true\n")
        with open(self.conf.with_suffix(".log"), "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: port_open(self.port), 10, f"mosquitto on port {self.port}")
        except BenchError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None


# --- the appliance daemon ------------------------------------------------------------------------


@dataclass
class Appliance:
    """The real daemon, ``appliance run --config FILE``, as a subprocess with a state folder of its own."""

    workdir: Path
    broker_port: int | None = None  # None: the embedded broker on a free port
    results: bool = True  # publish every result on appliance/{device}/results
    extra: str = ""  # more TOML, appended
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.mqtt_port = self.broker_port if self.broker_port is not None else free_port()
        self.device = f"bench-{self.http_port}"
        self.state_dir = self.workdir / f"state-{self.http_port}"
        self.config = self.workdir / f"appliance-{self.http_port}.toml"
        self.log_path = self.workdir / f"daemon-{self.http_port}.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        embedded = self.broker_port is None
        self.config.write_text(textwrap.dedent(f"""\
            device_id = "{self.device}"
            state_dir = "{self.state_dir}"
            [broker]
            mode = "{'embedded' if embedded else 'external'}"
            host = "127.0.0.1"
            port = {self.mqtt_port}
            [http]
            host = "127.0.0.1"
            port = {self.http_port}
            [outputs]
            results = {'true' if self.results else 'false'}
            """) + textwrap.dedent(self.extra))

    @property
    def results_topic(self) -> str:
        return f"appliance/{self.device}/results"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def cli(self, *args: str) -> str:
        try:
            r = subprocess.run([sys.executable, "-m", "appliance.cli", "--config", str(self.config), *args],
                               capture_output=True, text=True, cwd=ROOT, timeout=CLI_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"appliance {' '.join(args)} took more than {CLI_TIMEOUT_S:g} s") from e
        if r.returncode != 0:
            raise BenchError(f"appliance {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def start(self, wait: bool = True) -> None:
        """Start the daemon and (with ``wait``) wait until it reports itself healthy."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "run", "--config", str(self.config)],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_healthy()

    def wait_healthy(self) -> None:
        wait_until(self._healthy, START_TIMEOUT_S, f"daemon health (log: {self.log_path})", interval=0.1)

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the daemon exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return bool(self.status()["health"]["ok"])
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            data: bytes = r.read()
            return data

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/api/status"))
        return result

    def metrics(self) -> str:
        return self.get("/metrics").decode()

    def app_state(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.status()["apps"] if a["name"] == name), None)

    def serving(self, *apps: str) -> bool:
        states = {a["name"]: a["state"] for a in self.status()["apps"]}
        return all(states.get(a) == "serving" for a in apps)

    def worker_pids(self) -> dict[str, int]:
        return {f"worker-{w['partition']}": int(w["pid"]) for w in self.status()["workers"] if w.get("pid")}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (the first that carries ``labels``), or 0 if it is absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name or (head.startswith(name + "{") and all(f'{k}="{v}"' in head for k, v in labels.items())):
            return float(value)
    return 0.0
