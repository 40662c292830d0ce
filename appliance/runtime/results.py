"""What a model run yields, in one shape for every task, so rules need not know the task."""

from __future__ import annotations

from dataclasses import dataclass

from formats.sample import Prediction


@dataclass(frozen=True)  # no slots: it crosses the worker's pipe, see appliance.runtime.messages
class Detection:
    """One finding: a detected object, a top-k class, or an anomaly score (label ``"anomaly"``).

    ``box`` is ``(x1, y1, x2, y2)`` in coordinates of the original frame scaled to 0..1, or None
    for results that have no location (classification, telemetry).
    """

    label: str
    score: float
    box: tuple[float, float, float, float] | None = None

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "score": round(self.score, 4), "box": None if self.box is None else [round(v, 4) for v in self.box]}

    def prediction(self) -> Prediction:
        """This finding as a hard sample records it (formats.sample)."""
        box = None if self.box is None else (round(self.box[0], 4), round(self.box[1], 4), round(self.box[2], 4),
                                             round(self.box[3], 4))
        return Prediction(label=self.label, score=round(self.score, 4), box=box)
