"""A release on trial confirms its own health to the launcher, once, when every check passes:

the store opened and its migrations ran (the daemon got this far); the broker is connected; every
partition's worker is up and every app that served before the upgrade serves again; the console answers;
and, if the AppStore was reachable before the upgrade, a sync pass has reached it since this start (a
release that cannot phone home is not healthy). Until then nothing is written, and the launcher takes the
release back when its deadline passes. The problems are logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from appliance_launcher.state import Layout, Trial
from common import crashpoint

log = logging.getLogger(__name__)

CHECK_S = 0.5  # how often the checks run while on trial
LOG_AFTER_S = 10.0  # a new release takes a few seconds to connect and load: say nothing before this
LOG_EVERY_S = 60.0


class HealthConfirmation:
    def __init__(self, layout: Layout, trial: Trial, boot: str, problems: Callable[[Trial], Awaitable[list[str]]],
                 on_confirmed: Callable[[], None]) -> None:
        self._layout = layout
        self._trial = trial
        self._boot = boot
        self._problems = problems
        self._on_confirmed = on_confirmed
        self.last_problems: list[str] = []

    async def run(self) -> None:
        logged = time.monotonic() - LOG_EVERY_S + LOG_AFTER_S
        while True:
            problems = await self._problems(self._trial)
            if not problems:
                crashpoint.reached("upgrade.confirm")
                await asyncio.to_thread(self._layout.confirm, self._trial.version, self._boot)
                log.info("appliance %s confirmed its health to the launcher", self._trial.version)
                self._on_confirmed()
                return
            self.last_problems = problems
            if time.monotonic() - logged >= LOG_EVERY_S:
                logged = time.monotonic()
                log.warning("not yet confirming the upgrade to %s: %s", self._trial.version, "; ".join(problems))
            await asyncio.sleep(CHECK_S)
