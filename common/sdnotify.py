"""systemd's service notifications (sd_notify(3)), standard library only: ``READY=1`` once the daemon
serves, ``WATCHDOG=1`` from its event loop, ``STATUS=`` for ``systemctl status``. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op.

Never ``STOPPING=1`` from the daemon: a daemon stops for a switch to another release or a take-back while
its launcher goes on, and systemd, told the service is stopping, would kill the launcher when it did not
exit within ``TimeoutStopSec``. A second ``READY=1`` from the next release changes nothing.

Under the image's ``appliance.service`` the launcher is the service's main process and the daemon its
child, so the unit sets ``NotifyAccess=all`` and the daemon pings itself: the watchdog then watches the
event loop that does the work, and a hung daemon is restarted with its launcher.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) to systemd; False when not run by systemd or it cannot be told."""
    address = os.environ.get(NOTIFY_SOCKET, "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``WatchdogSec``, as sd_watchdog_enabled(3) advises; None
    when the unit has no watchdog. (``WATCHDOG_PID`` names the launcher, the main process; the daemon is
    its child and pings under ``NotifyAccess=all``, so it is not checked.)"""
    try:
        usec = int(os.environ.get(WATCHDOG_USEC, "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
