"""Rules: turn model results into events (debounce, cool-down, zones) and draw their snapshots."""

from appliance.rules.engine import Firing, RuleEngine, point_in_polygon
from appliance.rules.errors import RulesError, SnapshotError
from appliance.rules.snapshot import CARD_SIZE, draw_snapshot, render_telemetry_card

__all__ = [
    "CARD_SIZE",
    "Firing",
    "RuleEngine",
    "RulesError",
    "SnapshotError",
    "draw_snapshot",
    "point_in_polygon",
    "render_telemetry_card",
]
