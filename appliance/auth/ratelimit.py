"""Failed logins counted per user and address, per address and per user, over a sliding window.

Counting per (user, address) first means that an attacker guessing one user's password from one
address is stopped after a few tries, while the real user on another tablet still logs in. The wider
per-address limit stops one address trying many names (password spraying), the per-user limit many
addresses guessing one name. Counts are kept in memory: a restart forgets them, which costs an
attacker a restart of the appliance per few guesses.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from appliance.auth.errors import TooManyAttempts


@dataclass(frozen=True, slots=True)
class LoginLimits:
    window_s: float = 300.0  # seconds over which failures are counted
    per_user_address: int = 5  # failures for one user name from one address; the next attempt gets 429
    per_address: int = 20  # failures from one address, whatever the user names
    per_user: int = 50  # failures for one user name, from all addresses together
    max_tracked: int = 10_000  # keys kept at most (memory bound under a flood of random names)


class LoginLimiter:
    """Thread-safe; ``clock`` is monotonic seconds (a seam for tests)."""

    def __init__(self, limits: LoginLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LoginLimits()
        self._clock = clock
        self._failures: dict[tuple[str, ...], deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, user: str, address: str) -> list[tuple[tuple[str, ...], int, str]]:
        name = user.lower()
        lim = self.limits
        return [(("user+address", name, address), lim.per_user_address, f"for {user!r} from {address}"),
                (("address", address), lim.per_address, f"from {address}"),
                (("user", name), lim.per_user, f"for {user!r}")]

    def _recent(self, key: tuple[str, ...], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.limits.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def check(self, user: str, address: str) -> None:
        """Raise :class:`TooManyAttempts` (with the seconds to wait) if a limit is reached."""
        now = self._clock()
        with self._lock:
            for key, limit, why in self._keys(user, address):
                times = self._recent(key, now)
                if times is not None and len(times) >= limit:
                    # the oldest failure that keeps the count at the limit must leave the window
                    raise TooManyAttempts(times[-limit] + self.limits.window_s - now, why)

    def failed(self, user: str, address: str) -> int:
        """Count a failure; returns the failures for this user from this address in the window."""
        now = self._clock()
        with self._lock:
            if len(self._failures) + 3 > self.limits.max_tracked:  # a failure adds up to three keys
                self._sweep(now)
            for key, _, _ in self._keys(user, address):
                self._recent(key, now)
                self._failures.setdefault(key, deque()).append(now)
            return len(self._failures[self._keys(user, address)[0][0]])

    def succeeded(self, user: str, address: str) -> None:
        """Forget this user's failures from this address (not the wider counts: a valid login of one's own
        must not reset a spraying or distributed count)."""
        with self._lock:
            self._failures.pop(self._keys(user, address)[0][0], None)

    def _sweep(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        while self._failures and len(self._failures) + 3 > self.limits.max_tracked:  # still full: drop the oldest
            del self._failures[next(iter(self._failures))]
