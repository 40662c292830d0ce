"""The load generator: camera streams over MQTT, results back, latency measured in this client.

Stream ``i`` publishes pre-encoded JPEGs on ``{prefix}/s{i}/frame`` (QoS 0, as cameras do) and the
results of the system under test come back on one topic. Each frame carries its send time (epoch
seconds, this machine's clock) as the MQTT 5 user property ``ts``; the appliance and the naive baseline
echo it as the result's ``ts``, so each result is matched to its frame exactly. Without MQTT 5 (the
embedded broker), a result is matched to the newest frame of its source sent before the result's
``arrived``.

Two ways to drive a system:

- **closed loop** (``closed_loop``): each stream keeps exactly one frame in flight and sends the next
  as soon as the result of the previous one arrives (or after ``timeout_s``, counted as lost). This is
  "as fast as the system can take them" without a queue anywhere: throughput is what the system
  delivers with that many cameras waiting on it.
- **open loop** (``open_loop``): each stream publishes at a fixed rate whatever happens, with the
  streams' phases spread at random (seeded) over one period, as independent cameras are, or evenly.
  Used below capacity for latency and above it for overload.

The client has no network threads: both connections' I/O runs on the calling thread (``_pump``), so
it takes as little of the machine as it can (the cameras are other devices in a real site) and a
result's arrival time is taken the moment its packet is read.

All times below are epoch seconds (``time.time()``), which the daemon uses for ``arrived`` and ``done``.
"""

from __future__ import annotations

import bisect
import heapq
import json
import random
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.ingest.client import tcp_no_delay
from bench.procs import BenchError

__all__ = ["LoadClient", "LoadRun", "Matched"]

CONNECT_TIMEOUT_S = 10.0
DRAIN_S = 0.5  # open loop: after the last send, how long results are still collected


@dataclass(frozen=True, slots=True)
class Matched:
    source: str
    sent: float  # the frame left this client
    arrived: float  # it reached the system under test
    done: float  # its result was ready there
    received: float  # the result reached this client
    work: float | None = None  # the system's own decode + preprocess + infer time for this frame, if it says

    @property
    def latency(self) -> float:
        return self.received - self.sent

    @property
    def in_system(self) -> float:
        return self.done - self.arrived


@dataclass
class LoadRun:
    """What one run sent and got back; ``window`` is (start, end) of the measured part, epoch seconds."""

    streams: int
    window: tuple[float, float]
    sent: dict[str, list[float]] = field(default_factory=dict)  # source -> send times, in order
    matched: list[Matched] = field(default_factory=list)
    unmatched: int = 0  # results that fit no frame sent (should be 0)
    lost: int = 0  # closed loop: frames whose result did not come within the timeout

    def in_window(self) -> list[Matched]:
        start, end = self.window
        return [m for m in self.matched if start <= m.received < end]

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]

    def throughput(self) -> float:
        return len(self.in_window()) / self.seconds if self.seconds > 0 else 0.0

    def sent_in_window(self) -> int:
        start, end = self.window
        return sum(1 for times in self.sent.values() for t in times if start <= t < end)

    def unanswered(self, start: float, end: float) -> int:
        """Frames sent in [start, end) that got no result."""
        sent = sum(1 for times in self.sent.values() for t in times if start <= t < end)
        return sent - sum(1 for m in self.matched if start <= m.sent < end)

    def per_stream_fps(self) -> dict[str, float]:
        counts = {s: 0 for s in self.sent}
        for m in self.in_window():
            counts[m.source] = counts.get(m.source, 0) + 1
        return {s: n / self.seconds for s, n in counts.items()}


class LoadClient:
    """One publishing and one subscribing MQTT connection to the broker on ``port`` (loopback)."""

    def __init__(self, port: int, results_topic: str, frames: list[bytes], mqtt5: bool,
                 prefix: str = "cameras", drain_s: float = DRAIN_S) -> None:
        self.port = port
        self.drain_s = drain_s
        self.prefix = prefix  # frames go to {prefix}/s{i}/frame
        self.results_topic = results_topic
        self.frames = frames
        self.mqtt5 = mqtt5
        self._inbox: list[tuple[float, bytes]] = []  # (received, payload) of results not yet looked at
        self._misc_due = 0.0
        proto = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
        self._pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=proto)
        self._sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=proto)
        for client in (self._pub, self._sub):  # as the appliance does: no Nagle delay in the measurement
            client.on_socket_open = tcp_no_delay
        self._subscribed = threading.Event()
        self._sub.on_connect = lambda c, u, f, rc, p: c.subscribe(results_topic, qos=0)
        self._sub.on_subscribe = lambda c, u, mid, rc, p: self._subscribed.set()
        self._sub.on_message = lambda c, u, m: self._inbox.append((time.time(), bytes(m.payload)))

    def __enter__(self) -> Self:
        try:
            for c in (self._pub, self._sub):
                c.connect("127.0.0.1", self.port)
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while not (self._pub.is_connected() and self._subscribed.is_set()):
                if time.monotonic() > deadline:
                    raise BenchError(f"could not connect and subscribe to {self.results_topic} on port {self.port}")
                self._pump(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in (self._pub, self._sub):
            c.disconnect()
            c.loop_write()

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for either connection, then read what came and write what is queued."""
        socks = {sock: c for c in (self._pub, self._sub) if (sock := c.socket()) is not None}
        if not socks:
            raise BenchError("the load client lost its broker connection")
        writing = [sock for sock, c in socks.items() if c.want_write()]
        readable, writable, _ = select.select(list(socks), writing, [], max(0.0, timeout))
        for sock in readable:
            socks[sock].loop_read()
        for sock in writable:
            socks[sock].loop_write()
        now = time.monotonic()
        if now >= self._misc_due:  # keepalive pings
            self._misc_due = now + 1.0
            for c in socks.values():
                c.loop_misc()

    def _pump_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._pump(left)

    def _publish(self, stream: int, n: int) -> float:
        frame = self.frames[(stream * 7 + n) % len(self.frames)]
        sent = time.time()
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = [("ts", repr(sent))]
        self._pub.publish(f"{self.prefix}/s{stream}/frame", frame, qos=0, properties=props)
        return sent

    def _drain(self) -> list[tuple[float, dict[str, Any]]]:
        inbox, self._inbox = self._inbox, []
        return [(received, json.loads(payload)) for received, payload in inbox]

    def flush(self, quiet_s: float = 0.2, timeout_s: float = 10.0) -> None:
        """Forget results of earlier runs: wait until none has come for ``quiet_s`` (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        quiet_until = time.monotonic() + quiet_s
        while (now := time.monotonic()) < min(deadline, quiet_until):
            self._pump(min(deadline, quiet_until) - now)
            if self._inbox:
                self._inbox.clear()
                quiet_until = time.monotonic() + quiet_s

    # --- matching ---

    def _match(self, run: LoadRun, results: list[tuple[float, dict[str, Any]]]) -> None:
        exact: dict[tuple[str, float], float] = {(s, t): t for s, times in run.sent.items() for t in times}
        for received, doc in results:
            source, ts = str(doc["source"]), float(doc["ts"])
            sent = exact.get((source, ts))
            if sent is None:  # no MQTT 5: ts is the arrival time; the newest frame sent before it
                times = run.sent.get(source, [])
                i = bisect.bisect_right(times, float(doc["arrived"])) - 1
                if i < 0:
                    run.unmatched += 1
                    continue
                sent = times[i]
            work = doc.get("work_s")
            run.matched.append(Matched(source, sent, float(doc["arrived"]), float(doc["done"]), received,
                                       float(work) if isinstance(work, (int, float)) else None))

    # --- the two loops ---

    def closed_loop(self, streams: int, seconds: float, warmup: float, timeout_s: float = 5.0) -> LoadRun:
        """Each stream keeps one frame in flight; measured for ``seconds`` after ``warmup``."""
        self.flush()
        start = time.time()
        run = LoadRun(streams, (start + warmup, start + warmup + seconds),
                      sent={f"s{i}": [] for i in range(streams)})
        outstanding: dict[str, float] = {}
        counts = [0] * streams
        results: list[tuple[float, dict[str, Any]]] = []

        def send(i: int) -> None:
            sent = self._publish(i, counts[i])
            counts[i] += 1
            run.sent[f"s{i}"].append(sent)
            outstanding[f"s{i}"] = sent

        for i in range(streams):
            send(i)
        end = run.window[1]
        while True:
            now = time.time()
            if now >= end:
                break
            self._pump(min(0.05, end - now))
            for received, doc in self._drain():
                results.append((received, doc))
                source = str(doc["source"])
                if source in outstanding:
                    del outstanding[source]
                    send(int(source[1:]))
            for source, sent in list(outstanding.items()):
                if time.time() - sent > timeout_s:
                    run.lost += 1
                    send(int(source[1:]))
        results += self._drain()  # results that come later are outside the window: not waited for
        self._match(run, results)
        return run

    def open_loop(self, streams: int, rate_total: float, seconds: float, warmup: float, seed: int = 1,
                  stop: threading.Event | None = None, even: bool = False) -> LoadRun:
        """Each stream publishes ``rate_total / streams`` frames a second; measured for ``seconds`` after ``warmup``.

        The streams' phases are random (seeded), or with ``even`` spread evenly over one period, so that
        frames arrive one every ``1 / rate_total`` seconds. Setting ``stop`` ends the run early; the measured
        window then ends there.
        """
        self.flush()
        period = streams / rate_total
        rng = random.Random(seed)
        start = time.time() + 0.05
        run = LoadRun(streams, (start + warmup, start + warmup + seconds), sent={f"s{i}": [] for i in range(streams)})
        due = [(start + (i * period / streams if even else rng.uniform(0, period)), i) for i in range(streams)]
        heapq.heapify(due)
        counts = [0] * streams
        results: list[tuple[float, dict[str, Any]]] = []
        end = run.window[1]
        while True:
            when, i = due[0]
            now = time.time()
            if when >= end:
                break
            if stop is not None and stop.is_set():
                run.window = (run.window[0], max(run.window[0], now))
                break
            if when > now:
                self._pump(min(when - now, 0.05))
                results += self._drain()
                continue
            heapq.heapreplace(due, (when + period, i))
            run.sent[f"s{i}"].append(self._publish(i, counts[i]))
            counts[i] += 1
        self._pump_for(self.drain_s)
        results += self._drain()
        self._match(run, results)
        return run
