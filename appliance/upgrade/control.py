"""What a person may ask of the appliance's own upgrades, from the console, the API or ``appliance upgrade``:

- ``check``: look at the AppStore now (the sync pass runs at once);
- ``apply``: switch to an installed release now, even outside the maintenance window;
- ``postpone``: no switch before ``hours`` from now (downloading and installing go on);
- ``rollback``: back to the previous release on the box.

Each is audited with who asked and from where. Nothing here fetches, verifies or installs anything
itself: those stay with the agent and its signature checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from appliance.auth.accounts import Actor
from appliance.upgrade.agent import Upgrader
from appliance.upgrade.errors import UpgradeError

Action = Literal["check", "apply", "postpone", "rollback"]
ACTIONS: tuple[Action, ...] = ("check", "apply", "postpone", "rollback")
MAX_POSTPONE_H = 7 * 24.0


def act(upgrader: Upgrader | None, sync_now: Callable[[], None], action: Action, by: Actor,
        hours: float = 24.0) -> str:
    """Do ``action``; returns what was done, in a sentence. Raises UpgradeError when it cannot be done."""
    if upgrader is None:
        raise UpgradeError("upgrades need the AppStore link (appstore.url) and appliance-launcher; this appliance "
                           "has neither set up")
    if action == "check":
        sync_now()
        return "looking at the AppStore now"
    if action == "apply":
        upgrader.apply_now(by)
        sync_now()
        return f"switching to {upgrader.desired} as soon as it is installed" if upgrader.desired else "nothing to apply"
    if action == "postpone":
        if not 0 < hours <= MAX_POSTPONE_H:
            raise UpgradeError(f"postpone by more than 0 and at most {MAX_POSTPONE_H:g} hours, not {hours:g}")
        upgrader.postpone(time.time() + hours * 3600, by)
        return f"no switch for {hours:g} hours"
    return f"going back to {upgrader.rollback(by)}; the appliance restarts"
