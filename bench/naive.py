"""The naive baseline: what a user writes by hand, a paho callback that decodes and runs the model.

Subscribes to ``{prefix}/+/frame``; for each message, on paho's network thread, decodes the JPEG,
preprocesses it, runs the session and decodes the output with the appliance's own functions and
session options, then publishes one JSON result, shaped as the appliance's, on ``naive/results``.
No slots, no worker process, no dropping: messages wait in the broker and the socket. Run as::

    python -m bench.naive --port 1883 --model /tmp/models/bench-mobilenet --threads 2 [--mqtt5] [--prefix cameras]

It prints ``ready`` on stdout once subscribed and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_TOPIC = "naive/results"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True, help="a model package folder")
    parser.add_argument("--threads", type=int, required=True, help="ONNX Runtime intra-op threads")
    parser.add_argument("--mqtt5", action="store_true", help="speak MQTT 5 and read the 'ts' user property")
    parser.add_argument("--prefix", default="cameras", help="camera topics are PREFIX/{source}/frame")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    from appliance.ingest.client import tcp_no_delay
    from appliance.runtime.processing import decode_frame, decode_outputs, preprocess_image
    from bench.limit import session_options
    from formats.model_card import ImageInput, ModelCard

    card = ModelCard.load(args.model / "model.json")
    spec = card.input
    assert isinstance(spec, ImageInput)
    names = card.output_names()
    session = ort.InferenceSession((args.model / "model.onnx").read_bytes(), sess_options=session_options(args.threads),
                                   providers=["CPUExecutionProvider"])

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        arrived = time.time()
        source = msg.topic.split("/")[1]
        ts = arrived
        if msg.properties is not None:
            for key, value in getattr(msg.properties, "UserProperty", []) or []:
                if key == "ts":
                    ts = float(value)
        started = time.perf_counter()
        try:
            tensor, transform = preprocess_image(decode_frame(bytes(msg.payload)), spec)
            raw = session.run(names, {spec.name: tensor})
            detections = decode_outputs(card, dict(zip(names, raw)), transform)
            work = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - a bad frame must not kill the callback thread
            print(f"frame from {source} failed: {e}", file=sys.stderr, flush=True)
            return
        client.publish(RESULTS_TOPIC, json.dumps({
            "source": source, "app": "naive", "model": card.key, "ts": ts, "arrived": arrived, "done": time.time(),
            "work_s": round(work, 6),
            "detections": [d.to_json() for d in detections]}))

    subscribed = threading.Event()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe(f"{args.prefix}/+/frame", qos=0)

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: Any, rc: Any, props: Any) -> None:
        subscribed.set()

    proto = MQTTProtocolVersion.MQTTv5 if args.mqtt5 else MQTTProtocolVersion.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"naive-{args.port}", protocol=proto)
    client.on_socket_open = tcp_no_delay  # as the appliance does, so that the two differ only in the pipeline
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    client.loop_start()
    try:
        if not subscribed.wait(30):
            print("could not subscribe within 30 s", file=sys.stderr)
            return 1
        print("ready", flush=True)
        stop.wait()
    finally:
        client.loop_stop()
        client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
