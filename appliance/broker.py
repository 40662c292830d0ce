"""The embedded MQTT broker (amqtt) for development, demos and boxes with no Mosquitto.

It runs on its own thread and event loop so that a busy broker and the daemon's loop do not stall
each other. It listens on loopback only and allows anonymous clients: production sites use
Mosquitto (``broker.mode = "external"``) with per-device credentials and ACLs.
amqtt speaks MQTT 3.1.1 only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class BrokerError(ApplianceError):
    pass


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 256}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def start(self) -> None:
        if not _port_free(self.host, self.port):
            raise BrokerError(
                f"cannot start the embedded MQTT broker: {self.host}:{self.port} is already in use. "
                "Stop the other broker or daemon, or set broker.port (or broker.mode = \"external\" to use it)"
            )
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise BrokerError(f"the embedded MQTT broker did not start on {self.host}:{self.port}: {self._error}")
        log.info("embedded MQTT broker listening on %s:%s (MQTT 3.1.1, loopback, anonymous)", self.host, self.port)

    def _run(self) -> None:
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO; keep the daemon's log about the daemon
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            self._broker = Broker(self._config(), loop=loop)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except Exception as e:  # noqa: BLE001 - reported to start() through _error
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
        try:
            fut.result(STOP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a broker that will not stop must not block the daemon's exit
            log.warning("embedded broker did not stop cleanly: %r", e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        self._thread = None
