"""How long to wait before trying again after failures in a row: exponential, capped, with jitter.

Every retry loop of the repository (sample uploader, AppStore sync, resumed downloads, worker restarts)
takes its delays from one :class:`Backoff`, so they all grow, cap and spread the same way::

    policy = Backoff(base_s=2.0, max_s=300.0)
    failures = 0
    while not done():
        failures += 1
        time.sleep(policy.delay(failures))  # about 1-2 s, then 2-4 s, 4-8 s, ... never more than 300 s

Jitter spreads the appliances of a fleet that lost the AppStore at the same moment, so they do not all
come back in the same second; a local retry (a worker restart) can set ``jitter=0``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """The delay after the n-th failure in a row is ``min(max_s, base_s * 2 ** (n - 1))``, shortened by a
    random part of up to ``jitter`` of it (so the wait never exceeds ``max_s``)."""

    base_s: float = 1.0  # seconds after the first failure (before jitter)
    max_s: float = 300.0  # seconds: the longest wait
    jitter: float = 0.5  # fraction of each delay that is random, 0 (none) to 1

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < 0 or not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"{self}: base_s and max_s must be >= 0 and jitter within 0 to 1")

    def nominal(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row, before jitter (0 for none)."""
        if failures <= 0:
            return 0.0
        # capped exponent: 2 ** 1024 would overflow, and any exponent past the cap gives max_s anyway
        return min(self.max_s, self.base_s * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row, jittered (``rng`` for tests)."""
        nominal = self.nominal(failures)
        return nominal * (1.0 - self.jitter * (rng.random() if rng is not None else random.random()))
