"""Logging helpers: one setup for the daemon, and a throttle so a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable

THROTTLE_S = 60.0  # the same (source, reason) is logged at most once per this many seconds


class ThrottledLog:
    def __init__(self, logger: logging.Logger, interval_s: float = THROTTLE_S) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[Hashable, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        """An ERROR at most once per interval per ``key``; ``exc_info`` adds its traceback to the one logged."""
        self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def log(self, level: int, key: Hashable, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-1e18, 0))
            if now - last < self._interval:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
            if len(self._last) > 4096:
                self._last.clear()
        if suppressed:
            msg += f" (and {suppressed} more like it in the last {self._interval:.0f} s)"
        self._logger.log(level, msg, *args, exc_info=exc_info)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if RECENT_LOGS not in logging.getLogger().handlers:
        logging.getLogger().addHandler(RECENT_LOGS)


class RecentLogs(logging.Handler):
    """The daemon's last ``capacity`` log lines, kept in memory for the console's diagnostics bundle."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        self._lines: deque[str] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def lines(self) -> list[str]:
        return list(self._lines)


RECENT_LOGS = RecentLogs()
