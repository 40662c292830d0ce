"""The synthetic camera scene of the demo: a red square "person" walking over a dark textured yard,
sometimes wearing a blue round "helmet".

Used by the demo's simulated cameras, by tests and by benchmarks. Deterministic: the same
``(t, camera_index, size)`` always gives the same JPEG bytes, and ``object_positions`` says where
each object was drawn, so detections can be checked against the truth::

    jpeg = render_frame(12.5, camera_index=0)
    truth = object_positions(12.5, 0)  # {"person": (x1, y1, x2, y2), "helmet": None}
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["HELMET_COLOUR", "HELMET_PERIOD_S", "PERSON_COLOUR", "object_positions", "render_frame"]

PERSON_COLOUR = (210, 40, 40)
HELMET_COLOUR = (40, 70, 220)
HELMET_PERIOD_S = 5.0  # the helmet is worn during even periods: int(t / 5) even
PERSON_SIZE = 0.125  # side of the person square, fraction of the frame width (80 px at 640)
HELMET_SIZE = 0.075  # diameter of the helmet, fraction of the frame width (48 px at 640)
HELMET_GAP = 4  # pixels between the helmet and the top of the person

Box = tuple[int, int, int, int]


def object_positions(t: float, camera_index: int, width: int = 640, height: int = 480) -> dict[str, Box | None]:
    """Pixel boxes ``(x1, y1, x2, y2)`` (x2, y2 exclusive) of what ``render_frame`` draws; None when absent."""
    side = round(PERSON_SIZE * width)
    helmet = round(HELMET_SIZE * width)
    # the path: a slow Lissajous figure, a different phase and speed per camera
    margin_x = side / 2 + 2
    top = helmet + HELMET_GAP + side / 2 + 2
    phase = 1.7 * camera_index
    fx = (math.sin(2 * math.pi * t / (23.0 + 3.0 * camera_index) + phase) + 1) / 2
    fy = (math.sin(2 * math.pi * t / (17.0 + 2.0 * camera_index) + 2 * phase) + 1) / 2
    cx = margin_x + fx * (width - 2 * margin_x)
    cy = top + fy * (height - top - side / 2 - 2)
    x1, y1 = round(cx - side / 2), round(cy - side / 2)
    person: Box = (x1, y1, x1 + side, y1 + side)
    worn = math.floor(t / HELMET_PERIOD_S) % 2 == 0
    hx1 = round(cx - helmet / 2)
    hy2 = y1 - HELMET_GAP
    return {"person": person, "helmet": (hx1, hy2 - helmet, hx1 + helmet, hy2) if worn else None}


def render_frame(t: float, camera_index: int, width: int = 640, height: int = 480, quality: int = 80) -> bytes:
    """The JPEG of camera ``camera_index`` at time ``t`` seconds."""
    im = _background(camera_index, width, height).copy()
    draw = ImageDraw.Draw(im)
    boxes = object_positions(t, camera_index, width, height)
    person = boxes["person"]
    if person is not None:
        x1, y1, x2, y2 = person
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=PERSON_COLOUR)
    helmet = boxes["helmet"]
    if helmet is not None:
        x1, y1, x2, y2 = helmet
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=HELMET_COLOUR)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@lru_cache(maxsize=16)
def _background(camera_index: int, width: int, height: int) -> Image.Image:
    """A dark, grey-green yard: gradient, blotches and fine grain, so JPEG sizes look like a camera's."""
    rng = np.random.default_rng(7919 + camera_index)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 35 + 25 * (yy / height) + 10 * np.sin(xx / width * 3 + camera_index)
    # blotches: low-resolution noise scaled up smoothly
    coarse = Image.fromarray((rng.random((height // 16 + 1, width // 16 + 1)) * 255).astype(np.uint8))
    blotch = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255 - 0.5
    grain = rng.normal(0.0, 5.0, (height, width)).astype(np.float32)
    grey = base + 30 * blotch + grain
    tint = np.array([0.95, 1.05, 0.9], dtype=np.float32)  # slightly green, never red or blue enough to detect
    rgb = np.clip(grey[:, :, None] * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")
