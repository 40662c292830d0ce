"""Small inline SVG charts, drawn on the server: no chart library, nothing fetched by the browser."""

from __future__ import annotations

import math
from collections.abc import Sequence

WIDTH, HEIGHT, PAD = 240, 48, 3


def sparkline(points: Sequence[tuple[float, float]], width: int = WIDTH, height: int = HEIGHT) -> str:
    """A polyline of (time, value) points scaled to the box, as the ``points`` attribute of an SVG polyline.

    Non-finite values are left out; fewer than two points give an empty string (the page says "no trend yet").
    """
    pts = [(t, v) for t, v in points if math.isfinite(v) and math.isfinite(t)]
    if len(pts) < 2:
        return ""
    t0, t1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    margin = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0  # peaks do not touch the edge; a flat line sits mid-height
    lo, hi = lo - margin, hi + margin
    span_t = (t1 - t0) or 1.0
    span_v = hi - lo
    inner_w, inner_h = width - 2 * PAD, height - 2 * PAD
    return " ".join(f"{PAD + (t - t0) / span_t * inner_w:.1f},{PAD + (1 - (v - lo) / span_v) * inner_h:.1f}"
                    for t, v in pts)
