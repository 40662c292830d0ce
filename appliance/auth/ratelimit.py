"""Failed logins counted per user and address, per address and per user, over sliding windows.

Counting per (user, address) first means that an attacker guessing one user's password from one
address is stopped after a few tries, while the real user on another tablet still logs in. The wider
per-address limit stops one address trying many names (password spraying).

A name guessed from many addresses is the case where a plain per-user limit would hand the attacker a
lock-out: 50 wrong guesses would refuse the real admin's right password from everywhere. So the
per-user count never refuses an address on its own. Once a name has ``per_user`` failures in the window
it is *being guessed*, and then only addresses with failures of their own for that name get the stricter
budget (``per_user_address_guessed`` failures over ``guessed_window_s``); an address that has not failed
for that name always reaches the password check. Guessing stays bounded per address (a few tries for a
name, then one per ``guessed_window_s`` while the guessing goes on); what an attacker with many
addresses gains is one guess per fresh address, and each guess costs a scrypt hash, at most two at once.

:meth:`LoginLimiter.begin` checks and counts an attempt in one step, before the password is hashed, so
that many concurrent guesses from one address cannot all pass the check before the first is counted;
a right password withdraws it. Counts are kept in memory, with at most ``max_tracked`` keys in each
count (the least recently failed are dropped first): a restart forgets them, which costs an attacker a
restart of the appliance per few guesses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.auth.errors import TooManyAttempts

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class LoginLimits:
    window_s: float = 300.0  # seconds over which failures are counted
    per_user_address: int = 5  # failures for one user name from one address; the next attempt gets 429
    per_address: int = 20  # failures from one address, whatever the user names
    per_user: int = 50  # failures for one user name from all addresses: past this the name is being guessed
    per_user_address_guessed: int = 1  # failures of its own for a name being guessed that hold an address back
    guessed_window_s: float = 900.0  # seconds over which those are counted (the hold lasts this long at most)
    max_tracked: int = 10_000  # keys kept at most in each of the three counts (about 0.5 KiB each)

    def __post_init__(self) -> None:
        for name in ("per_user_address", "per_address", "per_user", "per_user_address_guessed", "max_tracked"):
            if getattr(self, name) < 1:  # 0 would refuse every attempt, even from an address that never failed
                raise ValueError(f"LoginLimits.{name} must be at least 1, not {getattr(self, name)}")
        if self.window_s <= 0 or self.guessed_window_s <= 0:
            raise ValueError("LoginLimits.window_s and guessed_window_s must be more than 0 seconds")


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """An attempt counted as a failure by :meth:`LoginLimiter.begin`, until it is withdrawn."""

    user: str
    address: str
    at: float  # the limiter's clock when it was counted
    failures: int  # failures for this user from this address in the window, this one included


class _Counts(Generic[K]):
    """Failure times per key, the newest ``per_key`` kept for ``horizon_s``; at most ``max_keys`` keys.

    Keys are kept in the order of their last failure, so expiry and the cap both take from the front.
    Not thread-safe: the limiter holds its lock."""

    def __init__(self, horizon_s: float, per_key: int, max_keys: int) -> None:
        self._horizon = horizon_s
        self._per_key = max(1, per_key)
        self._max_keys = max(1, max_keys)
        self._times: dict[K, list[float]] = {}

    def __len__(self) -> int:
        return len(self._times)

    def recent(self, key: K, now: float, within_s: float) -> list[float]:
        """The failure times of ``key`` in the last ``within_s`` seconds (at most ``horizon_s``), oldest first."""
        times = self._times.get(key)
        if not times:
            return []
        since = now - min(within_s, self._horizon)
        return [t for t in times if t > since]

    def add(self, key: K, now: float) -> None:
        self._expire(now)
        times = self._times.pop(key, [])
        times.append(now)
        del times[:-self._per_key]
        self._times[key] = times  # to the end: the most recently failed
        while len(self._times) > self._max_keys:
            del self._times[next(iter(self._times))]

    def remove(self, key: K, at: float) -> None:
        """Take back one failure counted at ``at`` (if it is still kept)."""
        times = self._times.get(key)
        if times and at in times:
            times.remove(at)
            if not times:
                del self._times[key]

    def forget(self, key: K) -> None:
        self._times.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._times:
            key = next(iter(self._times))
            if self._times[key][-1] > now - self._horizon:
                return
            del self._times[key]


class LoginLimiter:
    """Thread-safe; ``clock`` is monotonic seconds (a seam for tests)."""

    def __init__(self, limits: LoginLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or LoginLimits()
        self._clock = clock
        lim = self.limits
        self._user_address: _Counts[tuple[str, str]] = _Counts(
            max(lim.window_s, lim.guessed_window_s), max(lim.per_user_address, lim.per_user_address_guessed),
            lim.max_tracked)
        self._address: _Counts[str] = _Counts(lim.window_s, lim.per_address, lim.max_tracked)
        self._user: _Counts[str] = _Counts(lim.window_s, lim.per_user, lim.max_tracked)
        self._lock = threading.Lock()

    def check(self, user: str, address: str) -> None:
        """Raise :class:`TooManyAttempts` (with the seconds to wait) if a limit is reached."""
        with self._lock:
            self._check(user.lower(), user, address, self._clock())

    def begin(self, user: str, address: str) -> LoginAttempt:
        """Check the limits and count the attempt as a failure, in one step; :meth:`withdraw` it if the
        password turns out right. Raises :class:`TooManyAttempts`."""
        name, now = user.lower(), self._clock()
        with self._lock:
            self._check(name, user, address, now)
            return LoginAttempt(user, address, now, self._add(name, address, now))

    def withdraw(self, attempt: LoginAttempt) -> None:
        """Take back an attempt counted by :meth:`begin` (the password was right: it was no guess)."""
        name = attempt.user.lower()
        with self._lock:
            self._user_address.remove((name, attempt.address), attempt.at)
            self._address.remove(attempt.address, attempt.at)
            self._user.remove(name, attempt.at)

    def failed(self, user: str, address: str) -> int:
        """Count a failure; returns the failures for this user from this address in the window."""
        now = self._clock()
        with self._lock:
            return self._add(user.lower(), address, now)

    def succeeded(self, user: str, address: str) -> None:
        """Forget this user's failures from this address (not the wider counts: a valid login of one's own
        must not reset a spraying or distributed count)."""
        with self._lock:
            self._user_address.forget((user.lower(), address))

    def tracked(self) -> int:
        """Keys held in all counts together (for tests of the memory bound)."""
        with self._lock:
            return len(self._user_address) + len(self._address) + len(self._user)

    def _add(self, name: str, address: str, now: float) -> int:
        self._user_address.add((name, address), now)
        self._address.add(address, now)
        self._user.add(name, now)
        return len(self._user_address.recent((name, address), now, self.limits.window_s))

    def _check(self, name: str, user: str, address: str, now: float) -> None:
        lim = self.limits
        # the oldest failure that keeps a count at its limit must leave the window before the next try
        own = self._user_address.recent((name, address), now, lim.window_s)
        if len(own) >= lim.per_user_address:
            raise TooManyAttempts(own[-lim.per_user_address] + lim.window_s - now, f"for {user!r} from {address}",
                                  cause="user+address")
        spray = self._address.recent(address, now, lim.window_s)
        if len(spray) >= lim.per_address:
            raise TooManyAttempts(spray[-lim.per_address] + lim.window_s - now, f"from {address}", cause="address")
        everyone = self._user.recent(name, now, lim.window_s)
        if len(everyone) < lim.per_user:
            return
        held = self._user_address.recent((name, address), now, lim.guessed_window_s)
        if len(held) >= lim.per_user_address_guessed:
            # held back until this address's own failures age out, or the guessing from everywhere stops
            retry = min(held[-lim.per_user_address_guessed] + lim.guessed_window_s,
                        everyone[-lim.per_user] + lim.window_s) - now
            raise TooManyAttempts(retry, f"for {user!r} from {address} while that name is being guessed from "
                                         "many addresses", cause="user")
