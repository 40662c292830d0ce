"""Child processes that must not outlive the program that started them (standard library only)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For ``preexec_fn``: the child is killed when the thread that started it ends (Linux; elsewhere a no-op).
    Start such children from a thread that lives as long as they should."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
