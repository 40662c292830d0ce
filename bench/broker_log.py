"""What the managed broker's debug log costs: ``python -m bench.broker_log [--rate 500] [--seconds 8]``.

The managed Mosquitto logs at debug level because only there does it name a refused publish; that adds
two lines per frame (received, sent on), which the daemon reads and counts (``appliance.devices.activity``).
This runs Mosquitto twice on the same stream of camera frames, once with the levels the appliance had
before (no debug) and once with debug and the real line reader, and prints the CPU time of Mosquitto and
of the reader per thousand frames; Mosquitto's as a ratio against the run without debug, in this run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.devices.activity import BrokerActivity
from appliance.metrics import cpu_seconds
from bench.procs import free_port

FRAME_BYTES = 60_000  # a 640x480 JPEG of the demo's scenes is about this size
LEVELS = "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n"


def run_once(debug: bool, rate: float, seconds: float, folder: Path) -> dict[str, float]:
    port = free_port()
    config = folder / f"mosquitto-{'debug' if debug else 'info'}.conf"
    config.write_text(f"per_listener_settings true\npersistence false\nlog_dest stderr\nlog_timestamp false\n{LEVELS}"
                      f"{'log_type debug' if debug else ''}\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    activity, reader_cpu, lines, up = BrokerActivity({port: "certificate"}), [0.0], [0], threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            lines[0] += 1
            if line.endswith(" running"):
                up.set()
            activity.observe(line)
        reader_cpu[0] = time.thread_time()

    reader = threading.Thread(target=read)
    reader.start()
    if not up.wait(10):
        proc.kill()
        raise RuntimeError("mosquitto did not start")
    received, done = [0], threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="_appliance-bench")
    sub.on_message = lambda c, u, m: received.__setitem__(0, received[0] + 1)
    sub.connect("127.0.0.1", port)
    sub.subscribe("cameras/+/frame")
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cam1")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)  # both connected and subscribed
    frame, count = os.urandom(FRAME_BYTES), int(rate * seconds)
    cpu0, start = cpu_seconds(proc.pid) or 0.0, time.monotonic()
    for i in range(count):
        pub.publish("cameras/cam1/frame", frame)
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    deadline = time.monotonic() + 30
    while received[0] < count and time.monotonic() < deadline:
        done.wait(0.05)
    mosquitto_cpu = (cpu_seconds(proc.pid) or 0.0) - cpu0
    pub.loop_stop()
    sub.loop_stop()
    proc.terminate()
    proc.wait(10)
    reader.join(10)
    return {"frames": count, "received": received[0], "log_lines": lines[0],
            "mosquitto_cpu_ms_per_1000": 1000 * mosquitto_cpu / count * 1000,
            "reader_cpu_ms_per_1000": 1000 * reader_cpu[0] / count * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=500.0, help="frames per second (default 500)")
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {debug: run_once(debug, args.rate, args.seconds, Path(tmp)) for debug in (False, True)}
    base, debug = runs[False], runs[True]
    print(f"{args.rate:.0f} frames/s of {FRAME_BYTES} bytes for {args.seconds:.0f} s, one camera, one subscriber\n")
    print("| log levels | frames received | log lines | Mosquitto CPU ms / 1000 frames | reader CPU ms / 1000 frames |")
    print("|---|---|---|---|---|")
    for name, r in (("without debug", base), ("with debug (managed)", debug)):
        print(f"| {name} | {r['received']}/{r['frames']:.0f} | {r['log_lines']:.0f} | "
              f"{r['mosquitto_cpu_ms_per_1000']:.0f} | {r['reader_cpu_ms_per_1000']:.0f} |")
    ratio = debug["mosquitto_cpu_ms_per_1000"] / max(1e-9, base["mosquitto_cpu_ms_per_1000"])
    print(f"\nMosquitto's CPU with debug: {ratio:.2f}x the run without; the reader adds "
          f"{debug['reader_cpu_ms_per_1000']:.0f} µs of the daemon's CPU per frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
