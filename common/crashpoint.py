"""Crash points: a process killed at a named step, once, the way a power cut or the OOM killer kills it.

Off unless ``EDGE_APPLIANCE_CRASHPOINTS`` names a folder (a site never sets it). When it does, a process that
reaches step ``S`` while the file ``S`` exists in that folder removes the file and SIGKILLs itself: no
``finally``, no ``atexit``, no buffer flushed. The crash tests (tests/test_upgrade.py) arm one step per file
and watch the box come back on a working release with its data; the file makes each kill happen once.

    crashpoint.reached("upgrade.switch")  # in the daemon, between writing the request and exiting
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

__all__ = ["ENV", "reached"]

ENV = "EDGE_APPLIANCE_CRASHPOINTS"  # not APPLIANCE_*: those are settings


def reached(step: str) -> None:
    """Die here if ``step`` is armed; do nothing otherwise (one environment lookup)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        (Path(folder) / step).unlink()
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
