"""MQTT in: camera frames and sensor telemetry, checked cheaply and handed on.

Runs on the MQTT client's network thread and does only bounded work there (topic parsing, size and
format checks, JSON for telemetry); decoding happens in the partition worker. A message that is
refused is counted with its reason and logged with its source; nothing else is affected.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import FrameRejected
from appliance.ingest.client import MqttClient, ReceiveMessage
from appliance.logs import ThrottledLog
from appliance.runtime.processing import sniff_image
from appliance.settings import Settings
from appliance.stats import SourceKind, Stats

log = logging.getLogger(__name__)

SOURCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(slots=True, frozen=True)
class Frame:
    source: str
    kind: SourceKind
    topic: str
    arrived: float  # epoch seconds
    captured: float  # epoch seconds: the publisher's capture time, else arrival
    data: bytes = b""  # camera: encoded image
    values: dict[str, float] | None = None  # sensor: channel -> value


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def parse_telemetry(payload: bytes, limit: int) -> tuple[float | None, dict[str, float]]:
    """``{"ts": 1732000000.5, "values": {"ch4": 0.8}}`` -> (ts, values); raises FrameRejected."""
    if len(payload) > limit:
        raise FrameRejected("too_large", f"telemetry is {len(payload)} bytes, the limit is {limit} (ingest.max_telemetry_bytes)")

    def no_constants(name: str) -> float:
        raise FrameRejected("bad_value", f"telemetry contains {name}; send finite numbers only")

    try:
        doc = json.loads(payload, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameRejected("bad_json", f"telemetry is not valid JSON ({e}); expected {{\"ts\": ..., \"values\": {{...}}}}") from e
    except RecursionError as e:
        raise FrameRejected("bad_json", "telemetry is nested too deeply to read; send a flat "
                                        '{"ts": ..., "values": {"name": number}}') from e
    except ValueError as e:  # e.g. an integer of thousands of digits (Python's int_max_str_digits)
        raise FrameRejected("bad_json", f"telemetry cannot be read as JSON ({e}); send numbers of ordinary size") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict) or not doc["values"]:
        raise FrameRejected("bad_json", 'telemetry must be an object with a non-empty "values" object, '
                                        'e.g. {"ts": 1732000000.5, "values": {"ch4": 0.8}}')
    values: dict[str, float] = {}
    for name, value in doc["values"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FrameRejected("bad_value", f"channel {str(name)[:64]!r} has {_short(value)}; values must be numbers")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise FrameRejected("bad_value", f"channel {str(name)[:64]!r} is {_short(value)}; values must be finite")
        values[str(name)] = number
    ts = doc.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not _finite(ts)):
        raise FrameRejected("bad_value", f'"ts" is {_short(ts)}; it must be epoch seconds')
    return (float(ts) if ts is not None else None), values


def _finite(number: float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: object) -> str:
    """A value for a message: an attacker's megabyte-long list or thousand-digit number is cut."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else "a number too large"
    return text if len(text) <= 80 else text[:77] + "..."


class Ingest:
    def __init__(
        self,
        client: MqttClient,
        settings: Settings,
        stats: Stats,
        accepts: Callable[[str], bool],
        offer: Callable[[Frame], None],
    ) -> None:
        self._client = client
        self._settings = settings
        self._stats = stats
        self._accepts = accepts  # does an enabled app listen to this topic?
        self._offer = offer  # hands a checked message on (to the partitions' latest-wins slots)
        self._unsubscribe: list[Callable[[], None]] = []
        self._log = ThrottledLog(log)

    def start(self) -> None:
        t = self._settings.topics
        self._unsubscribe = [
            self._client.subscribe(f"{t.cameras}/+/frame", self._on_frame),
            self._client.subscribe(f"{t.sensors}/+/telemetry", self._on_telemetry),
        ]

    def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []

    def reject(self, source: str, kind: SourceKind, reason: str, detail: str) -> None:
        self._stats.rejected(source, kind, reason, detail)
        self._log.warning((source, reason), "%s %s rejected (%s): %s", kind, source, reason, detail)

    def _source(self, msg: ReceiveMessage, kind: SourceKind) -> str | None:
        source = msg.topic.split("/")[1]
        if not SOURCE_ID.fullmatch(source):
            self._stats.unknown_source("(invalid)", "bad_source_id", msg.received)
            self._log.warning(("(invalid)", "bad_source_id"), "%s topic %r rejected: the source id must be 1-64 of "
                              "A-Z a-z 0-9 _ . - starting with a letter or digit", kind, msg.topic)
            return None
        if not self._accepts(msg.topic):
            if self._stats.unknown_source(source, "unknown_source", msg.received):
                log.warning("%s %s rejected (unknown_source): no enabled app listens to %s; install or enable an "
                            "app whose sources match it", kind, source, msg.topic)
            return None
        self._stats.received(source, kind, msg.received)
        return source


    def _on_frame(self, msg: ReceiveMessage) -> None:
        source = self._source(msg, "camera")
        if source is None:
            return
        limit = self._settings.ingest.max_frame_bytes
        if len(msg.payload) > limit:
            self.reject(source, "camera", "too_large",
                        f"frame is {_mb(len(msg.payload))}, the limit is {_mb(limit)} (ingest.max_frame_bytes)")
            return
        if sniff_image(msg.payload) is None:
            head = msg.payload[:8].hex(" ") or "empty"
            self.reject(source, "camera", "not_an_image",
                        f"payload ({len(msg.payload)} bytes, starts {head}) is not a JPEG or PNG image; "
                        "publish one encoded image per message")
            return
        captured = msg.received
        ts = msg.user_properties.get("ts")
        if ts is not None:
            try:
                value = float(ts)
                if math.isfinite(value):
                    captured = value
            except ValueError:
                pass
        self._stats.frame(source, msg.payload, msg.received)
        self._offer(Frame(source, "camera", msg.topic, msg.received, captured, data=msg.payload))

    def _on_telemetry(self, msg: ReceiveMessage) -> None:
        source = self._source(msg, "sensor")
        if source is None:
            return
        try:
            ts, values = parse_telemetry(msg.payload, self._settings.ingest.max_telemetry_bytes)
        except FrameRejected as e:
            self.reject(source, "sensor", e.reason, e.detail)
            return
        self._stats.values(source, values, ts or msg.received)
        self._offer(Frame(source, "sensor", msg.topic, msg.received, ts or msg.received, values=values))


