"""The shared mechanisms in ``common``: the backoff policy every retry loop uses."""

from __future__ import annotations

import random

import pytest

from common.backoff import Backoff


def test_backoff_doubles_up_to_its_cap_and_jitter_only_shortens() -> None:
    policy = Backoff(base_s=2.0, max_s=10.0, jitter=0.5)
    assert [policy.nominal(n) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays), "within half of the nominal 8 s, never above it"
    assert max(delays) - min(delays) > 2.0, "spread, so a fleet does not retry in step"
    assert policy.delay(10_000) <= 10.0, "a long outage neither overflows nor passes the cap"


def test_backoff_without_jitter_is_exact_and_a_bad_policy_is_refused() -> None:
    assert [Backoff(0.5, 30.0, jitter=0.0).delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)
