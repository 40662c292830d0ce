"""Simulated cameras and a gas/temperature sensor that publish over MQTT like real devices do."""

from __future__ import annotations

import json
import math
import threading
import time

from appliance.demo.scene import render_frame
from appliance.ingest.client import MqttClient
from appliance.settings import BrokerSettings


class _Publisher:
    def __init__(self, broker: BrokerSettings, client_id: str, period_s: float) -> None:
        self._client = MqttClient(broker, client_id=client_id)
        self._period = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=client_id, daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._client.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.stop()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            if self._client.connected:
                t = time.monotonic() - start
                topic, payload = self.message(t)
                self._client.publish(topic, payload)
                self.sent += 1
            self._stop.wait(self._period)

    def message(self, t: float) -> tuple[str, bytes]:
        raise NotImplementedError


class CameraSimulator(_Publisher):
    """Publishes JPEG frames of the synthetic scene to ``cameras/{source}/frame``."""

    def __init__(self, broker: BrokerSettings, source: str, index: int, fps: float = 5.0,
                 width: int = 640, height: int = 480, prefix: str = "cameras") -> None:
        super().__init__(broker, f"sim-{source}", 1.0 / fps)
        self._topic = f"{prefix}/{source}/frame"
        self._index, self._size = index, (width, height)

    def message(self, t: float) -> tuple[str, bytes]:
        return self._topic, render_frame(t, self._index, *self._size)


class GasSensorSimulator(_Publisher):
    """Publishes ``{"ts", "values": {"ch4", "temp"}}``; methane spikes for a few seconds every ``spike_every_s``."""

    def __init__(self, broker: BrokerSettings, source: str, hz: float = 2.0, spike_every_s: float = 20.0,
                 prefix: str = "sensors") -> None:
        super().__init__(broker, f"sim-{source}", 1.0 / hz)
        self._topic = f"{prefix}/{source}/telemetry"
        self._spike_every = spike_every_s

    def message(self, t: float) -> tuple[str, bytes]:
        spiking = 4.0 <= t % self._spike_every < 7.0  # 3 s of methane, first 4 s after start
        ch4 = 2.6 if spiking else 0.5 + 0.05 * math.sin(t)
        temp = 25.0 + 0.5 * math.sin(t / 7)
        return self._topic, json.dumps({"ts": time.time(), "values": {"ch4": round(ch4, 3), "temp": round(temp, 2)}}).encode()
