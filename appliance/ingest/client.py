"""The only module that touches paho-mqtt: connect, reconnect with backoff, resubscribe, publish.

No paho type leaves this module. Callbacks given to :meth:`MqttClient.subscribe` run on the client's
network thread: they must be quick and thread-safe (ingest hands work to the event loop itself, with
a coalesced wake-up, so a flood of messages can never grow the loop's queue without bound).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.logs import ThrottledLog
from appliance.settings import BrokerSettings
from appliance.status import BrokerStatus

log = logging.getLogger(__name__)
_throttled = ThrottledLog(log)


@dataclass(slots=True, frozen=True)
class ReceiveMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    received: float  # epoch seconds, when the message reached this process
    user_properties: dict[str, str] = field(default_factory=dict)


MessageCallback = Callable[[ReceiveMessage], None]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching with ``+`` and ``#``."""
    return mqtt.topic_matches_sub(topic_filter, topic)


class MqttClient:
    """A long-lived MQTT connection that survives broker restarts.

    ``will`` is ``(topic, payload)`` published retained by the broker if this client vanishes.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        will: tuple[str, bytes] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._v5 = settings.mqtt_version == "5"
        self._subs: dict[str, list[MessageCallback]] = {}
        self._lock = threading.Lock()
        self.handler_errors = 0  # messages whose handler raised (logged once a minute per kind of topic and error)
        self._connected = threading.Event()
        self._on_connection_change = on_connection_change
        self._started = False
        self.connects = 0
        self.disconnects = 0
        protocol = MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self._client.reconnect_delay_set(
            min_delay=max(1, round(settings.reconnect_min_s)), max_delay=max(1, round(settings.reconnect_max_s))
        )
        self._client.max_queued_messages_set(1000)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls_ca or settings.tls_cert:
            self._client.tls_set(
                ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
                certfile=str(settings.tls_cert) if settings.tls_cert else None,
                keyfile=str(settings.tls_key) if settings.tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_socket_open = tcp_no_delay
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def status(self) -> BrokerStatus:
        s = self._settings
        return BrokerStatus(mode=s.mode, host=s.host, port=s.port, protocol=s.mqtt_version, connected=self.connected)

    def start(self) -> None:
        """Begin connecting in the background; reconnects on its own with backoff."""
        s = self._settings
        self._started = True
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, last_words: tuple[str, bytes] | None = None) -> None:
        """Publish ``last_words`` (retained) if connected, disconnect cleanly and stop the network thread."""
        if not self._started:
            return
        self._started = False
        if last_words is not None and self.connected:
            info = self._client.publish(last_words[0], last_words[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic_filter: str, callback: MessageCallback) -> Callable[[], None]:
        """Call ``callback`` (on the network thread) for every message matching ``topic_filter``.

        Returns the function that unsubscribes.
        """
        with self._lock:
            first = topic_filter not in self._subs
            self._subs.setdefault(topic_filter, []).append(callback)
        if first and self.connected:
            self._client.subscribe(topic_filter, qos=0)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subs.get(topic_filter, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                last = not callbacks and topic_filter in self._subs
                if last:
                    del self._subs[topic_filter]
            if last and self.connected:
                self._client.unsubscribe(topic_filter)

        return unsubscribe

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; returns False (and drops it) when paho's bounded queue is full."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN

    # paho callbacks, on the network thread

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused the connection: %s", self._settings.host, self._settings.port, reason)
            return
        self.connects += 1
        with self._lock:
            filters = list(self._subs)
        for topic_filter in filters:
            client.subscribe(topic_filter, qos=0)
        log.info("connected to broker %s:%s (MQTT %s)", self._settings.host, self._settings.port,
                 self._settings.mqtt_version)
        self._connected.set()
        if self._on_connection_change:
            self._on_connection_change(True)

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            self.disconnects += 1
            if self._started:
                log.warning("lost the broker connection (%s); reconnecting with backoff", reason)
            if self._on_connection_change:
                self._on_connection_change(False)

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props: dict[str, str] = {}
        if self._v5 and message.properties is not None:
            for key, value in getattr(message.properties, "UserProperty", []) or []:
                props[str(key)] = str(value)
        msg = ReceiveMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            received=time.time(),
            user_properties=props,
        )
        with self._lock:
            callbacks = [cb for f, cbs in self._subs.items() if mqtt.topic_matches_sub(f, msg.topic) for cb in cbs]
        for cb in callbacks:
            try:
                cb(msg)
            except Exception as e:  # noqa: BLE001 - one bad handler must not kill the network thread, nor flood the log
                self.handler_errors += 1
                where = "/".join(msg.topic.split("/")[:1])  # per kind of topic, never per (attacker-chosen) id
                _throttled.error((where, type(e).__name__), "handler for %s failed: %s: %s", msg.topic[:200],
                                 type(e).__name__, e, exc_info=e)


def tcp_no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send each MQTT packet at once (no Nagle): a small result or event must not wait up to a delayed ACK
    (tens of milliseconds) behind the previous packet; the broker is on the same box or LAN."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def publish_properties(user: dict[str, str]) -> Properties:
    """MQTT 5 PUBLISH properties carrying user properties (for publishers such as the simulators)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = list(user.items())
    return props
