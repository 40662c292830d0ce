"""Blur the regions of chosen labels in a frame before it leaves the site."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from PIL import Image, ImageFilter

from formats.sample import Prediction

BLUR_RADIUS_FRACTION = 0.06  # of the region's larger side: faces and bodies become unrecognisable


def redact(jpeg: bytes, predictions: Iterable[Prediction], labels: Sequence[str], quality: int = 90) -> bytes:
    """``jpeg`` with every predicted box of ``labels`` blurred (boxes in 0..1 of the frame); as is if none."""
    boxes = [p.box for p in predictions if p.label in labels and p.box is not None]
    if not boxes:
        return jpeg
    with Image.open(io.BytesIO(jpeg)) as im:
        img = im.convert("RGB")
    w, h = img.size
    for box in boxes:
        x1, y1, x2, y2 = box
        region = (max(0, int(x1 * w)), max(0, int(y1 * h)), min(w, int(x2 * w) + 1), min(h, int(y2 * h) + 1))
        if region[2] <= region[0] or region[3] <= region[1]:
            continue
        side = max(region[2] - region[0], region[3] - region[1])
        patch = img.crop(region).filter(ImageFilter.GaussianBlur(max(4.0, side * BLUR_RADIUS_FRACTION)))
        img.paste(patch, region[:2])
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()
