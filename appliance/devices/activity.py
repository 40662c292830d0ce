"""What the managed Mosquitto's log says the devices did: connections, messages and refusals.

Mosquitto 2.0 names a refused publish (``Denied PUBLISH from cam1 ...``) only at its debug level, so the
managed broker logs at that level and this reader keeps the lines that matter out of the appliance's log:
per-message lines are counted, not logged; refusals are logged at most once a minute per cause. Each
device listener sets ``use_username_as_clientid``, so every line about a device names it by its id (the
certificate's CN or the password user), and a client id cannot carry a newline into the log (Mosquitto
closes such a connection), so no client can write a line of its own here. The daemon's names start with
"_", which no device id does.

A refusal before the client is known — a certificate from another CA, an expired or revoked one, none, a
wrong password — names only the address it came from; those are kept per address, listener and reason,
with the device that last connected from that address as a hint.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.logs import ThrottledLog
from appliance.store.devices import DEVICE_ID
from appliance.store.records import DeviceActivity, RefusedConnection

log = logging.getLogger("appliance.mosquitto")
throttled = ThrottledLog(log)

NEW_CONNECTION = re.compile(r"New connection from (\S+) on port (\d+)\.$")
FAILED = re.compile(r"Client connection from (\S+) failed: (.*)$")  # TLS refused it before "New connection"
CONNECTED = re.compile(r"New client connected from (\S+) as \S+ \(.*u'([^']*)'\)\.?$")
PUBLISH = re.compile(r"(Denied) PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '(.*)', \.\.\. \(\d+ bytes\)\)$")
UNKNOWN_GONE = "Client <unknown> disconnected"
CHATTER = ("Received ", "Sending ", "No will message specified")  # debug lines, one or more per message
MAX_UNKNOWN = 256  # refused addresses kept between flushes (a scan from many addresses cannot grow it further)


def refusal_reason(detail: str) -> str:
    """What an admin can act on, from Mosquitto's words (an OpenSSL error or its own)."""
    d = detail.lower()
    if "certificate verify failed" in d:
        return ("its certificate is not from this appliance's device CA, or has expired or been revoked: give it new "
                "credentials (appliance devices renew ID)")
    if "did not return a certificate" in d:
        return "it sent no client certificate: install the device's certificate and key, or enrol it with a password"
    if "not authorised" in d:
        return ("wrong user name or password, or the device was revoked or removed: check the credentials the device "
                "uses against appliance devices list")
    if "wrong version number" in d or "http request" in d or "unknown protocol" in d:
        return "it did not speak TLS: set the device to MQTT over TLS (mqtts) with the appliance's CA certificate"
    if "unexpected eof" in d:
        return "it closed the connection before TLS was set up (a port scan, or a device giving up)"
    return f"the connection failed: {detail[:200]}"


@dataclass(slots=True)
class _Pending:
    address: str
    port: int
    detail: str = ""


@dataclass(slots=True)
class _Unknown:
    count: int
    first: float
    last: float
    hint: str


@dataclass
class BrokerActivity:
    """Reads Mosquitto's log lines (one thread) and hands what they said to the store (another)."""

    listeners: dict[int, str]  # port -> "certificate", "password", ...
    clock: Callable[[], float] = time.time
    _devices: dict[str, DeviceActivity] = field(default_factory=dict)
    _unknown: dict[tuple[str, str, str], _Unknown] = field(default_factory=dict)
    _pending: _Pending | None = None
    _last_device_at: dict[str, str] = field(default_factory=dict)  # address -> the device last connected from it
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, line: str) -> bool:
        """Take ``line`` if it is about a client; False leaves it to the caller to log."""
        if line.startswith("Received PUBLISH from "):  # one per message: the cheapest path
            end = line.find(" ", 22)
            self._message(line[22:end])
            return True
        if line.startswith("Denied PUBLISH"):
            if m := PUBLISH.match(line):
                self._denied(m.group(2), m.group(3))
            return True
        if line.startswith(CHATTER):
            return True
        if m := NEW_CONNECTION.match(line):
            self._pending = _Pending(m.group(1).rpartition(":")[0], int(m.group(2)))
            return True
        if line.startswith("OpenSSL Error"):
            if self._pending is not None and not self._pending.detail:
                self._pending.detail = line.partition(":")[2].rpartition(":")[2].strip()
            return True
        if line.startswith(UNKNOWN_GONE):
            pending, self._pending = self._pending, None
            if pending is not None:
                self._refused(pending.address, pending.port, pending.detail or line[len(UNKNOWN_GONE):].strip(" :,."))
            return True
        if m := FAILED.match(line):
            self._refused(m.group(1), None, m.group(2).rpartition(":")[2].strip(" ."))
            return True
        if m := CONNECTED.search(line):
            self._connected(m.group(1).rpartition(":")[0], m.group(2))
            log.info("%s", line)
            return True
        return False

    def _connected(self, address: str, user: str) -> None:
        self._pending = None
        if not DEVICE_ID.fullmatch(user):  # the daemon ("_appliance"), or a client of the development listener
            return
        with self._lock:
            self._activity(user).last_connect = self.clock()
            if len(self._last_device_at) > MAX_UNKNOWN:
                self._last_device_at.clear()
            self._last_device_at[address] = user

    def _message(self, device: str) -> None:
        now = self.clock()
        with self._lock:
            if (a := self._devices.get(device)) is None:
                if not DEVICE_ID.fullmatch(device):
                    return
                a = self._devices[device] = DeviceActivity()
            a.last_message = now

    def _denied(self, device: str, topic: str) -> None:
        if not DEVICE_ID.fullmatch(device):
            return
        now = self.clock()
        with self._lock:
            a = self._activity(device)
            a.refusals += 1
            a.last_refusal = f"published to {topic[:200]}, which its ACL does not allow (a device writes only its own topic)"
            a.last_refusal_ts = now
        throttled.warning(("denied", device), "device %s: a publish to %s was refused (a device may write only its own "
                          "topic; is it set up with another device's id?)", device, topic[:200])

    def _refused(self, address: str, port: int | None, detail: str) -> None:
        """A connection refused before its device was known; ``port`` is its listener's, when the log said."""
        if port is None and "certificate" in detail:
            listener = "certificate"  # the one listener that asks for client certificates
        else:
            listener = self.listeners.get(port, str(port)) if port is not None else "TLS"
        reason = refusal_reason(detail)
        now = self.clock()
        with self._lock:
            hint = self._last_device_at.get(address, "")
            key = (address, listener, reason)
            if (entry := self._unknown.get(key)) is not None:
                entry.count, entry.last, entry.hint = entry.count + 1, now, hint or entry.hint
            elif len(self._unknown) < MAX_UNKNOWN:
                self._unknown[key] = _Unknown(1, now, now, hint)
        throttled.warning(("refused", address, reason), "a connection from %s to the %s listener was refused: %s%s",
                          address, listener, reason, f" ({hint} connected from there before)" if hint else "")

    def _activity(self, device: str) -> DeviceActivity:
        if (a := self._devices.get(device)) is None:
            a = self._devices[device] = DeviceActivity()
        return a

    def take(self) -> tuple[dict[str, DeviceActivity], list[RefusedConnection]]:
        """What was seen since the last call, for the store."""
        with self._lock:
            devices, unknown = self._devices, self._unknown
            self._devices, self._unknown = {}, {}
        return devices, [RefusedConnection(address=a, listener=listener, reason=r, count=u.count, first=u.first,
                                           last=u.last, hint=u.hint) for (a, listener, r), u in unknown.items()]
