"""Which partition each app runs in: bin-packing with admission control, a pure computation (no I/O).

First-fit-decreasing packs a handful of partitions near-optimally and gives refusals a plain explanation; the current
placement is kept wherever it still fits because moving an app means reloading its model in another partition.

Example::

    bins = [Bin("gpu0", "gpu", 16384), Bin("cpu", "cpu", 8192)]
    placement = place([Demand("ppe", "ppe@1", 900), Demand("smoke", "smoke@2", 400, prefers_gpu=False)], bins)
    placement.assignments  # {"ppe": "gpu0", "smoke": "cpu"}
    admit(Demand("fall", "fall@1", 20000), [...], bins, placement.assignments)  # raises AdmissionError

Rules, in order of precedence:

- An app already in ``current`` stays there while its partition exists, it still fits and no pin says otherwise.
- The others are placed pinned first, then by memory, largest first; each goes to the first partition with room,
  trying GPU kinds (``gpu``, ``mig``, ``slice``) before ``cpu`` (the reverse for ``prefers_gpu=False``) and, within
  that order, partitions that already hold its model before the rest.
- A model is counted once per partition, at the largest estimate among the apps that use it there; compute shares
  add up per app and may not exceed the partition's ``compute_percent``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from appliance.errors import ApplianceError

KINDS: Final = ("cpu", "gpu", "mig", "slice")
GPU_KINDS: Final = frozenset({"gpu", "mig", "slice"})


class AdmissionError(ApplianceError):
    """A deployment or model swap does not fit; nothing was changed. The message names the partition and numbers."""

    def __init__(self, app: str, reason: str) -> None:
        super().__init__(f"cannot deploy {app}: {reason}")
        self.app = app
        self.reason = reason

    def __reduce__(self) -> tuple[type[AdmissionError], tuple[str, str]]:
        return (AdmissionError, (self.app, self.reason))


@dataclass(slots=True, frozen=True)
class Bin:
    """One partition's capacity."""

    name: str
    kind: str  # "cpu", "gpu" (a whole GPU), "mig" (a MIG instance) or "slice" (a soft slice of a GPU)
    memory_mb: int | None  # None: unlimited
    compute_percent: int = 100  # share of the device's compute this partition may hand out

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"partition {self.name}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.memory_mb is not None and self.memory_mb < 0:
            raise ValueError(f"partition {self.name}: memory_mb must not be negative, got {self.memory_mb}")
        if not 1 <= self.compute_percent <= 100:
            raise ValueError(f"partition {self.name}: compute_percent must be 1 to 100, got {self.compute_percent}")


@dataclass(slots=True, frozen=True)
class Demand:
    """What one app needs. ``memory_mb`` is its model's footprint, paid once per partition however many apps share
    the model there; ``compute_percent`` is the app's own share and adds up per app."""

    app: str
    model: str  # model key, name@version
    memory_mb: int
    compute_percent: int = 0
    pin: str | None = None  # partition the app must run in
    prefers_gpu: bool = True

    def __post_init__(self) -> None:
        if self.memory_mb < 0:
            raise ValueError(f"app {self.app}: memory_mb must not be negative, got {self.memory_mb}")
        if self.compute_percent < 0:
            raise ValueError(f"app {self.app}: compute_percent must not be negative, got {self.compute_percent}")


@dataclass(slots=True, frozen=True)
class BinUsage:
    """How full one partition is after placement."""

    name: str
    kind: str
    memory_mb: int | None  # capacity; None: unlimited
    memory_used_mb: int
    memory_free_mb: int | None  # None: unlimited
    compute_percent: int  # capacity
    compute_used_percent: int
    models: dict[str, int]  # model key -> MB counted for it here (once, however many apps use it)
    apps: tuple[str, ...]  # sorted

    @property
    def compute_free_percent(self) -> int:
        return self.compute_percent - self.compute_used_percent


@dataclass(slots=True, frozen=True)
class Placement:
    """The outcome of :func:`place`; dictionaries are ordered by app name (``usage`` by partition order)."""

    assignments: dict[str, str]  # app -> partition
    refused: dict[str, str]  # app -> why, naming the partition(s) and the numbers
    usage: dict[str, BinUsage]  # partition -> usage
    moved: dict[str, str] = field(default_factory=dict)  # app -> partition it had in ``current`` and no longer has


class _Load:
    """Mutable tally of one partition while placing."""

    __slots__ = ("apps", "bin", "compute_used", "memory_used", "models")

    def __init__(self, b: Bin) -> None:
        self.bin = b
        self.memory_used = 0
        self.compute_used = 0
        self.models: dict[str, int] = {}
        self.apps: list[str] = []

    def memory_free(self) -> int | None:
        return None if self.bin.memory_mb is None else self.bin.memory_mb - self.memory_used

    def compute_free(self) -> int:
        return self.bin.compute_percent - self.compute_used

    def extra_memory(self, d: Demand) -> int:
        loaded = self.models.get(d.model)
        return d.memory_mb if loaded is None else max(0, d.memory_mb - loaded)

    def memory_short(self, d: Demand) -> bool:
        free = self.memory_free()
        return free is not None and self.extra_memory(d) > free

    def compute_short(self, d: Demand) -> bool:
        return d.compute_percent > self.compute_free()

    def fits(self, d: Demand) -> bool:
        return not self.memory_short(d) and not self.compute_short(d)

    def add(self, d: Demand) -> None:
        self.memory_used += self.extra_memory(d)
        self.models[d.model] = max(self.models.get(d.model, 0), d.memory_mb)
        self.compute_used += d.compute_percent
        self.apps.append(d.app)

    def usage(self) -> BinUsage:
        return BinUsage(
            name=self.bin.name,
            kind=self.bin.kind,
            memory_mb=self.bin.memory_mb,
            memory_used_mb=self.memory_used,
            memory_free_mb=self.memory_free(),
            compute_percent=self.bin.compute_percent,
            compute_used_percent=self.compute_used,
            models=dict(sorted(self.models.items())),
            apps=tuple(sorted(self.apps)),
        )


def place(demands: list[Demand], bins: list[Bin], current: dict[str, str] | None = None) -> Placement:
    """Pack ``demands`` into ``bins``, keeping ``current`` (app -> partition) where it still fits.

    Deterministic: the result depends on the set of demands, the order of ``bins`` and ``current``, never on the
    order of ``demands``. Raises ValueError for duplicate app or partition names. Inputs are not modified.
    """
    _check_unique("app", [d.app for d in demands])
    _check_unique("partition", [b.name for b in bins])
    current = current or {}
    loads = {b.name: _Load(b) for b in bins}
    order = sorted(demands, key=_ffd_key)
    assignments: dict[str, str] = {}
    refused: dict[str, str] = {}

    for d in order:  # keep what runs where it runs
        where = current.get(d.app)
        if where is not None and where in loads and d.pin in (None, where) and loads[where].fits(d):
            loads[where].add(d)
            assignments[d.app] = where

    for d in order:
        if d.app in assignments:
            continue
        if d.pin is not None:
            target = loads.get(d.pin)
            if target is None:
                known = ", ".join(b.name for b in bins) or "none are configured"
                refused[d.app] = f"pinned to {d.pin}, which does not exist (partitions: {known})"
            elif target.fits(d):
                target.add(d)
                assignments[d.app] = d.pin
            else:
                refused[d.app] = _pinned_refusal(d, target)
            continue
        candidates = _candidates(d, bins, loads)
        chosen = next((load for load in candidates if load.fits(d)), None)
        if chosen is None:
            refused[d.app] = _refusal(d, candidates)
        else:
            chosen.add(d)
            assignments[d.app] = chosen.bin.name

    moved = {d.app: current[d.app] for d in demands if d.app in current and assignments.get(d.app) != current[d.app]}
    return Placement(
        assignments=dict(sorted(assignments.items())),
        refused=dict(sorted(refused.items())),
        usage={b.name: loads[b.name].usage() for b in bins},
        moved=dict(sorted(moved.items())),
    )


def admit(new: Demand, existing: list[Demand], bins: list[Bin], current: dict[str, str] | None = None) -> Placement:
    """The placement with ``new`` added; raise :class:`AdmissionError` if it does not fit or would move or refuse
    any other app. An entry in ``existing`` with the same app name is replaced (an upgrade of that app)."""
    others = [d for d in existing if d.app != new.app]
    baseline = place(others, bins, current)
    placement = place([*others, new], bins, current)
    reason = _admission_problem(new.app, baseline, placement)
    if reason and current and new.app in current:
        # An upgraded app that kept its place first may crowd out its neighbours: let it move instead.
        rest = {app: where for app, where in current.items() if app != new.app}
        placement = place([*others, new], bins, rest)
        reason = _admission_problem(new.app, baseline, placement)
    if reason:
        raise AdmissionError(new.app, reason)
    return placement


def admit_swap(app: str, old: Demand, new: Demand, existing: list[Demand], bins: list[Bin],
               current: dict[str, str] | None = None) -> Placement:
    """The placement after hot-swapping ``app`` from ``old`` to ``new`` (usually another model version) in place.

    During the swap both models are loaded in the app's partition, so it must have room for the new one beside the
    old one (and for any extra compute share); otherwise :class:`AdmissionError` says how much more is needed. An
    app that is not placed has nothing loaded to swap, so this is a plain :func:`admit` of ``new``.
    """
    if old.app != app or new.app != app:
        raise ValueError(f"admit_swap({app!r}): both demands must be for {app}, got {old.app!r} and {new.app!r}")
    others = [d for d in existing if d.app != app]
    baseline = place([*others, old], bins, current)
    where = baseline.assignments.get(app)
    if where is None:
        return admit(new, others, bins, current)
    usage = baseline.usage[where]
    loaded = usage.models.get(new.model)
    extra_memory = new.memory_mb if loaded is None else max(0, new.memory_mb - loaded)
    extra_compute = max(0, new.compute_percent - old.compute_percent)
    needs: list[str] = []
    has: list[str] = []
    if usage.memory_free_mb is not None and extra_memory > usage.memory_free_mb:
        needs.append(f"{extra_memory} MB")
        has.append(f"{usage.memory_free_mb} MB")
    if extra_compute > usage.compute_free_percent:
        needs.append(f"{extra_compute} % compute")
        has.append(f"{usage.compute_free_percent} % compute")
    if needs:
        raise AdmissionError(app, f"swapping {app} to model {new.model} needs {' and '.join(needs)} more in {where}, "
                                  f"which has {' and '.join(has)} free")
    placement = place([*others, new], bins, current)
    after = placement.assignments.get(app)
    if after != where:
        outcome = f"move it from {where} to {after}" if after else f"leave it without a partition ({where} was)"
        raise AdmissionError(app, f"swapping {app} to model {new.model} would {outcome}")
    reason = _admission_problem(app, baseline, placement)
    if reason:
        raise AdmissionError(app, reason)
    return placement


def _ffd_key(d: Demand) -> tuple[bool, int, int, str, str]:
    # Apps of one model sort next to each other, so the first to land draws the rest to the same partition.
    return (d.pin is None, -d.memory_mb, -d.compute_percent, d.model, d.app)


def _candidates(d: Demand, bins: list[Bin], loads: dict[str, _Load]) -> list[_Load]:
    def rank(item: tuple[int, Bin]) -> tuple[bool, bool, int]:
        index, b = item
        return ((b.kind in GPU_KINDS) != d.prefers_gpu, d.model not in loads[b.name].models, index)

    return [loads[b.name] for _, b in sorted(enumerate(bins), key=rank)]


def _refusal(d: Demand, candidates: list[_Load]) -> str:
    if not candidates:
        return "no partitions are configured"
    need = f"{d.memory_mb} MB" + (f" and {d.compute_percent} % compute" if d.compute_percent else "")
    return f"needs {need}, " + ", ".join(_shortfall(d, load) for load in candidates)


def _shortfall(d: Demand, load: _Load) -> str:
    parts: list[str] = []
    if load.memory_short(d):
        text = f"{load.memory_free()} MB free (of {load.bin.memory_mb} MB)"
        extra = load.extra_memory(d)
        if extra != d.memory_mb:
            text += f" for the {extra} MB more it needs there"
        parts.append(text)
    if load.compute_short(d):
        parts.append(f"{load.compute_free()} % compute free (of {load.bin.compute_percent} %)")
    return f"{load.bin.name} has {' and '.join(parts)}"


def _pinned_refusal(d: Demand, load: _Load) -> str:
    has: list[str] = []
    needs: list[str] = []
    if load.memory_short(d):
        has.append(f"{load.memory_free()} MB free of {load.bin.memory_mb} MB")
        extra = load.extra_memory(d)
        needs.append(f"{extra} MB" if extra == d.memory_mb else f"{extra} MB more ({d.model} is loaded there)")
    if load.compute_short(d):
        has.append(f"{load.compute_free()} % compute free of {load.bin.compute_percent} %")
        needs.append(f"{d.compute_percent} % compute")
    return f"pinned to {load.bin.name}, which has {' and '.join(has)}; needs {' and '.join(needs)}"


def _admission_problem(app: str, baseline: Placement, placement: Placement) -> str | None:
    """Why ``placement`` is not admissible: ``app`` refused, or another app placed differently than without it."""
    if app in placement.refused:
        return placement.refused[app]
    for other, where in baseline.assignments.items():
        now = placement.assignments.get(other)
        if other != app and now != where:
            return (f"it would move {other} from {where} to {now}" if now
                    else f"it would leave no room for {other} ({placement.refused[other]})")
    return None


def _check_unique(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name} appears twice")
        seen.add(name)
