"""Hands memory the daemon freed back to the operating system, once a lot of it was let go at once.

CPython frees a big object (a camera's 2 MB frame) with ``free()``; glibc keeps a freed chunk that is not at
the top of its heap for reuse, so when many cameras go silent and their frames are forgotten, the daemon's
resident memory stays at its high-water mark. ``malloc_trim(0)`` returns the free pages of every arena.
:class:`GiveBack` watches what a component holds and trims when it dropped by ``threshold_bytes`` since the
last look; where the C library has no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

THRESHOLD_BYTES = 16 * 1024 * 1024  # a drop this large in what is held is worth a trim
CHECK_S = 10.0  # how often the daemon looks


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


class GiveBack:
    def __init__(self, held: Callable[[], int], threshold_bytes: int = THRESHOLD_BYTES) -> None:
        self._held = held  # bytes the watched component holds now (thread-safe)
        self._threshold = threshold_bytes
        self._peak = 0
        self._trim = _malloc_trim()
        self.trims = 0

    async def check(self) -> None:
        """Trim (on a worker thread) if what is held fell by the threshold since the highest it was seen."""
        held = self._held()
        self._peak = max(self._peak, held)
        if self._trim is None or self._peak - held < self._threshold:
            return
        released = self._peak - held
        self._peak = held
        await asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
        self.trims += 1
        log.debug("gave memory back to the system after %.0f MB were let go", released / 2**20)
