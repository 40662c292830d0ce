"""Where each app runs: demands from the installed apps and models, packed into the partitions.

The same computation serves the CLI's admission check at install (refuse before anything changes)
and the daemon's placement at every reload (kept stable: adding an app never moves the others).
"""

from __future__ import annotations

from collections.abc import Mapping

from appliance.runtime.partitions import PartitionPlan
from appliance.runtime.placement import Bin, Demand, Placement, admit, admit_swap, place
from appliance.store import AppRecord, ModelRecord
from formats import AppManifest, ModelCard

BASE_SESSION_MB = 32  # a model's session costs about this much beyond twice its file size until measured


def model_memory_mb(model: ModelRecord, measured: Mapping[str, float]) -> int:
    """Measured at load if it was; else the card's estimate; else a rule of thumb from the file size."""
    if measured.get(model.key):
        return max(1, round(measured[model.key]))
    card = ModelCard.parse(model.card_json.encode(), model.key)
    if card.memory_mb:
        return card.memory_mb
    return BASE_SESSION_MB + 2 * (model.size_bytes // (1024 * 1024))


def demand_for(manifest: AppManifest, models: Mapping[str, ModelRecord], pins: Mapping[str, str],
               measured: Mapping[str, float]) -> Demand:
    model = models.get(manifest.model.key)
    memory = manifest.resources.memory_mb or (model_memory_mb(model, measured) if model else BASE_SESSION_MB)
    return Demand(app=manifest.name, model=manifest.model.key, memory_mb=memory,
                  compute_percent=manifest.resources.compute_percent, pin=pins.get(manifest.name),
                  prefers_gpu=manifest.resources.prefers_gpu)


def bins_for(plans: list[PartitionPlan]) -> list[Bin]:
    return [Bin(p.name, p.kind, p.memory_mb, p.compute_percent) for p in plans]


def demands_for(apps: list[AppRecord], models: list[ModelRecord], pins: Mapping[str, str],
                measured: Mapping[str, float]) -> list[Demand]:
    by_key = {m.key: m for m in models}
    return [demand_for(AppManifest.parse(a.manifest_json.encode(), a.name), by_key, pins, measured)
            for a in apps if a.enabled]


def placement_for(apps: list[AppRecord], models: list[ModelRecord], plans: list[PartitionPlan],
                  pins: Mapping[str, str], current: dict[str, str] | None = None,
                  measured: Mapping[str, float] | None = None) -> Placement:
    return place(demands_for(apps, models, pins, measured or {}), bins_for(plans), current)


def admit_app(manifest: AppManifest, apps: list[AppRecord], models: list[ModelRecord], plans: list[PartitionPlan],
              pins: Mapping[str, str]) -> Placement:
    """Raise AdmissionError unless ``manifest`` fits beside the installed apps.

    An upgrade to another model is a hot swap: both versions are loaded in the app's partition for a moment,
    so that partition must hold both.
    """
    by_key = {m.key: m for m in models}
    bins = bins_for(plans)
    existing = demands_for(apps, models, pins, {})
    current = place(existing, bins).assignments
    new = demand_for(manifest, by_key, pins, {})
    old = next((d for d in existing if d.app == manifest.name), None)
    if old is not None and old.model != new.model and manifest.name in current:
        return admit_swap(manifest.name, old, new, existing, bins, current)
    return admit(new, existing, bins, current)
