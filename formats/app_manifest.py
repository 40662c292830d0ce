"""The app manifest (``app.json``): what a site runs.

An app binds sources (MQTT topic filters) to one model and turns the model's output into events
through rules. Example::

    {
      "schema": 1, "name": "ppe-watch", "version": "1.0.0",
      "model": {"name": "ppe-detector", "version": "1.0.0"},
      "sources": ["cameras/+/frame"],
      "rules": [{"name": "person-in-zone", "labels": ["person"], "min_score": 0.5,
                 "zone": [[0, 0], [1, 0], [1, 1], [0, 1]],
                 "debounce": {"n": 2, "m": 3}, "cooldown_s": 10}]
    }
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from formats.errors import load_json_document, parse_json_document
from formats.model_card import NAME_PATTERN, VERSION_PATTERN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class Debounce(_Strict):
    """Fire only when at least ``n`` of the last ``m`` results matched."""

    n: int = Field(default=1, ge=1)
    m: int = Field(default=1, ge=1, le=1000)

    @model_validator(mode="after")
    def _n_le_m(self) -> Debounce:
        if self.n > self.m:
            raise ValueError(f"debounce n ({self.n}) must not exceed m ({self.m})")
        return self


class Rule(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    labels: list[str] = Field(default_factory=list)  # empty: any label
    min_score: float = Field(default=0.5, ge=0)
    # polygon in frame coordinates 0..1 (x right, y down); a detection matches when its box centre is inside
    zone: list[tuple[float, float]] | None = None
    debounce: Debounce = Debounce()
    cooldown_s: float = Field(default=30.0, ge=0)  # seconds; no second event for the same rule and source

    @field_validator("zone")
    @classmethod
    def _zone_is_polygon(cls, zone: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if zone is None:
            return None
        if len(zone) < 3:
            raise ValueError("a zone needs at least 3 points")
        for x, y in zone:
            if not (0 <= x <= 1 and 0 <= y <= 1):
                raise ValueError(f"zone point ({x}, {y}) is outside 0..1")
        return zone


class Resources(_Strict):
    """What the app asks of its partition; unset values are taken from the model card or measured at load."""

    memory_mb: int | None = Field(default=None, gt=0)  # resident memory of the model session
    compute_percent: int = Field(default=0, ge=0, le=100)  # share of the partition's compute it needs
    prefers_gpu: bool = True


Share = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]


class SamplePolicy(_Strict):
    """Which frames of this app are kept as hard samples for retraining (docs/samples.md); a site admin can
    change it in the appliance's settings (``[samples.apps.NAME]``, a :class:`SamplePolicyOverride`)."""

    near_threshold: Share = 0.05  # score within ± this of a rule's min_score; 0: off
    false_positive: bool = True  # frames an operator marks as a false positive
    missed_detection: bool = True  # frames an operator marks as a missed detection
    random_rate: Share = 0.0  # share of all processed frames
    classes: list[str] = Field(default_factory=list)  # frames with a detection of these labels
    per_minute: Count = 6  # limits for the automatic reasons (operators' flags are not limited)
    per_hour: Count = 60
    per_day: Count = 500
    dedup_s: Seconds = 60.0  # one sample per source and label within this many seconds

    def overridden(self, override: SamplePolicyOverride | None) -> SamplePolicy:
        """This policy with a site's override applied: the keys the site set replace the app's."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class SamplePolicyOverride(_Strict):
    """A site's change to an app's :class:`SamplePolicy`: the same keys, each optional (unset: the app's own).
    An unknown key or a value out of range is an error that names it, like any other setting."""

    near_threshold: Share | None = None
    false_positive: bool | None = None
    missed_detection: bool | None = None
    random_rate: Share | None = None
    classes: list[str] | None = None
    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None
    dedup_s: Seconds | None = None


class AppManifest(_Strict):
    schema_version: Literal[1] = Field(default=1, alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    description: str = ""
    model: ModelRef
    sources: list[str] = Field(min_length=1)  # MQTT topic filters, e.g. "cameras/+/frame"
    rules: list[Rule] = Field(min_length=1)
    resources: Resources = Resources()
    samples: SamplePolicy = SamplePolicy()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("sources")
    @classmethod
    def _filters_well_formed(cls, sources: list[str]) -> list[str]:
        for f in sources:
            parts = f.split("/")
            if len(parts) != 3 or parts[2] not in ("frame", "telemetry"):
                raise ValueError(
                    f"source filter {f!r} must look like 'cameras/<id or +>/frame' or 'sensors/<id or +>/telemetry'"
                )
            if "#" in f or any("+" in p and p != "+" for p in parts):
                raise ValueError(f"source filter {f!r}: '+' must be a whole level and '#' is not allowed")
        kinds = {f.split("/")[2] for f in sources}
        if len(kinds) > 1:
            raise ValueError("an app takes either camera frames or sensor telemetry, not both")
        return sources

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def source_kind(self) -> Literal["camera", "sensor"]:
        return "camera" if self.sources[0].endswith("/frame") else "sensor"

    @classmethod
    def load(cls, path: Path) -> AppManifest:
        return load_json_document(cls, path)

    @classmethod
    def parse(cls, raw: bytes, where: str) -> AppManifest:
        return parse_json_document(cls, raw, where)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)
