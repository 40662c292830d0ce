"""Which results become hard samples: the app's policy (with the site's overrides), limits and de-duplication.

Runs on the pipeline's event loop for every result, so the decision is cheap: no I/O. Reasons, most
valuable first (the spool drops the least valuable first when full): operator-flagged (false positive,
missed detection), near threshold, by class, random.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Mapping

from appliance.runtime.results import Detection
from formats.app_manifest import AppManifest, SamplePolicy, SamplePolicyOverride
from formats.sample import Reason

PRIORITY: dict[str, int] = {"random": 0, "class": 1, "near_threshold": 2, "false_positive": 3,
                            "missed_detection": 3}
WINDOWS = (("per_minute", 60.0), ("per_hour", 3600.0), ("per_day", 86400.0))


def effective_policy(manifest: AppManifest, overrides: Mapping[str, SamplePolicyOverride]) -> SamplePolicy:
    """The app's own policy with the site's ``[samples.apps.NAME]`` override applied."""
    return manifest.samples.overridden(overrides.get(manifest.name))


class Chooser:
    """Decides, per result, whether to keep the frame and why; remembers limits and recent samples."""

    def __init__(self, overrides: Mapping[str, SamplePolicyOverride], rng: random.Random | None = None) -> None:
        self._overrides = overrides
        self._rng = rng or random.Random()  # sampling, not security
        self._taken: dict[str, deque[float]] = {}  # app -> when its automatic samples were taken (a day's)
        self._last: dict[tuple[str, str, str], float] = {}  # (app, source, label) -> last sample
        # the policy in force per app manifest (kept with the manifest, so that the id is never reused)
        self._policies: dict[int, tuple[AppManifest, SamplePolicy]] = {}

    def choose(self, manifest: AppManifest, source: str, detections: list[Detection],
               now: float | None = None) -> tuple[Reason, str] | None:
        """(reason, label) if this result should be kept, else None."""
        now = time.time() if now is None else now
        policy = self._policy(manifest)
        found = self._reason(manifest, policy, detections)
        if found is None:
            return None
        reason, label = found
        key = (manifest.name, source, label)
        if policy.dedup_s and now - self._last.get(key, -1e18) < policy.dedup_s:
            return None
        if not self._within_limits(manifest.name, policy, now):
            return None
        self._last[key] = now
        if len(self._last) > 10_000:
            self._last.clear()
        return reason, label

    def _policy(self, manifest: AppManifest) -> SamplePolicy:
        """Validated once per manifest the pipeline serves, not once per frame."""
        cached = self._policies.get(id(manifest))
        if cached is not None and cached[0] is manifest:
            return cached[1]
        if len(self._policies) > 256:
            self._policies.clear()
        policy = effective_policy(manifest, self._overrides)
        self._policies[id(manifest)] = (manifest, policy)
        return policy

    def _reason(self, manifest: AppManifest, policy: SamplePolicy,
                detections: list[Detection]) -> tuple[Reason, str] | None:
        if policy.near_threshold > 0:
            for rule in manifest.rules:
                for d in detections:
                    near = abs(d.score - rule.min_score) <= policy.near_threshold
                    if near and (not rule.labels or d.label in rule.labels):
                        return "near_threshold", d.label
        wanted = set(policy.classes)
        for d in detections:
            if d.label in wanted:
                return "class", d.label
        if policy.random_rate > 0 and self._rng.random() < policy.random_rate:
            return "random", detections[0].label if detections else ""
        return None

    def _within_limits(self, app: str, policy: SamplePolicy, now: float) -> bool:
        taken = self._taken.setdefault(app, deque())
        while taken and now - taken[0] > 86400.0:
            taken.popleft()
        for field, window in WINDOWS:
            limit = int(getattr(policy, field))
            if sum(1 for t in taken if now - t <= window) >= limit:
                return False
        taken.append(now)
        return True
