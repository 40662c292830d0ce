"""Work done beside the rules for each result or event: sample capture, result publishing, the MQTT event
message, the console's live feed. Whatever it raises is counted (``appliance_side_work_errors``) and logged
at most once a minute per cause, with its traceback; it never stops the rules or the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter

from appliance.logs import ThrottledLog

log = logging.getLogger(__name__)


class SideWork:
    def __init__(self, errors: Counter) -> None:
        self._errors = errors
        self._log = ThrottledLog(log)

    def run(self, work: str, who: str, fn: Callable[..., object], *args: object) -> None:
        """``fn(*args)``; a failure is counted under ``work`` and logged once a minute per (work, who, error)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - by design: side work must not take the alerts with it
            self._errors.labels(work).inc()
            self._log.error((work, who, type(e).__name__), "%s for %s failed (the rules and events go on): %s: %s",
                            work, who, type(e).__name__, e, exc_info=e)
