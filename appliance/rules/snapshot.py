"""Event snapshots: the frame with its detections drawn on, or a card for a telemetry alert.

Both return JPEG bytes, so every event has one image whatever its source::

    jpeg = draw_snapshot(frame_bytes, firing.detections, highlight=firing.detection)
    card = render_telemetry_card("sensors/pump1/telemetry", {"temp": 81.2}, firing.detection, firing.ts)
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from appliance.rules.errors import SnapshotError
from appliance.runtime.results import Detection

__all__ = ["CARD_SIZE", "draw_snapshot", "render_telemetry_card"]

Colour = tuple[int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

BOX_COLOUR: Colour = (0, 200, 255)
HIGHLIGHT_COLOUR: Colour = (255, 40, 40)
TEXT_ON_COLOUR: Colour = (0, 0, 0)
BAND_COLOUR: Colour = (0, 0, 0)
BAND_TEXT_COLOUR: Colour = (255, 255, 255)
CARD_BACKGROUND: Colour = (30, 32, 36)
CARD_TEXT_COLOUR: Colour = (230, 230, 230)
CARD_SIZE = (480, 200)  # pixels, width x height
CARD_FONT_PX = 14

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@lru_cache(maxsize=16)
def _font(size: int) -> Font:
    # Pillow's bundled default font; scalable when Pillow has FreeType, a fixed bitmap font otherwise.
    return ImageFont.load_default(size)


def _decode(frame: bytes, max_side: int) -> Image.Image:
    """Decode a JPEG or PNG into RGB, shrunk so its longest side is at most ``max_side`` pixels."""
    try:
        with Image.open(io.BytesIO(frame), formats=("JPEG", "PNG")) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))  # let libjpeg decode at a reduced scale
            rgb = img.convert("RGB")
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    except _DECODE_ERRORS as e:
        raise SnapshotError(f"cannot decode frame ({len(frame)} bytes) as JPEG or PNG: {e}") from e
    return rgb


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _caption(d: Detection) -> str:
    return f"{d.label} {d.score:.2f}"


def _pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int] | None:
    if not all(math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in box)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return (
        min(round(x1 * width), width - 1),
        min(round(y1 * height), height - 1),
        min(round(x2 * width), width - 1),
        min(round(y2 * height), height - 1),
    )


def _draw_box(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], d: Detection, colour: Colour, line: int, font: Font, top_y: int
) -> None:
    """Outline ``d`` and caption it, keeping the caption below ``top_y`` (the bottom of the text band)."""
    width, height = size
    px = None if d.box is None else _pixel_box(d.box, width, height)
    if px is None:
        return
    x1, y1, x2, y2 = px
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
    text = _caption(d)
    left, top, right, bottom = (round(v) for v in draw.textbbox((0, 0), text, font=font))
    pad = max(1, line // 2)
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    tx = max(0, min(x1, width - tw))
    ty = y1 - th if y1 - th >= top_y else max(y1, top_y)  # above the box, or inside it if there is no room
    draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
    draw.text((tx + pad - left, ty + pad - top), text, fill=TEXT_ON_COLOUR, font=font)


def _draw_band(draw: ImageDraw.ImageDraw, width: int, items: Iterable[tuple[str, Colour]], font: Font) -> int:
    """Write captions of unlocated results as wrapped text on a dark band across the top; return its height."""
    pad, gap = 4, 12
    line_h = round(draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    placed: list[tuple[int, int, str, Colour]] = []
    x, y = pad, pad
    for text, colour in items:
        tw = round(draw.textlength(text, font=font))
        if x > pad and x + tw > width - pad:
            x, y = pad, y + line_h
        placed.append((x, y, text, colour))
        x += tw + gap
    if not placed:
        return 0
    band_h = y + line_h + pad
    draw.rectangle((0, 0, width - 1, band_h), fill=BAND_COLOUR)
    for tx, ty, text, colour in placed:
        draw.text((tx, ty), text, fill=colour, font=font)
    return band_h + 1


def draw_snapshot(
    frame: bytes,
    detections: list[Detection],
    highlight: Detection | None = None,
    max_side: int = 1280,
    quality: int = 85,
) -> bytes:
    """Return ``frame`` as a JPEG no larger than ``max_side`` on its longest side, with ``detections`` drawn on.

    Boxes are outlined and captioned with label and score; ``highlight`` (usually the detection that
    fired the rule) is drawn last, thicker and in its own colour. Results without a box are listed on a
    text line across the top. Raises :class:`SnapshotError` (a ``ValueError``) if ``frame`` is not a
    decodable JPEG or PNG.
    """
    if max_side < 1:
        raise SnapshotError(f"max_side must be at least 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise SnapshotError(f"quality must be 1..100, got {quality}")
    img = _decode(frame, max_side)
    longest = max(img.size)
    line = max(2, round(longest / 320))
    font = _font(max(10, round(longest / 64)))
    draw = ImageDraw.Draw(img)

    others = [d for d in detections if highlight is None or d != highlight]
    unlocated = [(_caption(d), BAND_TEXT_COLOUR) for d in others if d.box is None]
    if highlight is not None and highlight.box is None:
        unlocated.insert(0, (_caption(highlight), HIGHLIGHT_COLOUR))
    # The band goes first so that box captions can be kept clear of it.
    band_h = _draw_band(draw, img.width, unlocated, font)
    for d in others:
        if d.box is not None:
            _draw_box(draw, img.size, d, BOX_COLOUR, line, font, band_h)
    if highlight is not None and highlight.box is not None:
        _draw_box(draw, img.size, highlight, HIGHLIGHT_COLOUR, 2 * line, font, band_h)
    return _encode(img, quality)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, max_width: float) -> str:
    """Shorten ``text`` with a trailing '...' until it fits in ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def _utc(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"ts={ts!r}"


def render_telemetry_card(source: str, values: dict[str, float], detection: Detection, ts: float) -> bytes:
    """Return a small JPEG card (:data:`CARD_SIZE`) summarising a telemetry alert.

    Shows the alert label and score, the source, the time in UTC and the channel values; channels
    that do not fit are counted in a final "+N more" entry.
    """
    width, height = CARD_SIZE
    img = Image.new("RGB", CARD_SIZE, CARD_BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(CARD_FONT_PX)
    pad = 10
    line_h = round(draw.textbbox((0, 0), "Ag", font=font)[3]) + 4

    header_h = line_h + 2 * 6
    draw.rectangle((0, 0, width - 1, header_h), fill=HIGHLIGHT_COLOUR)
    draw.text(
        (pad, 6),
        _fit(draw, f"ALERT  {detection.label}  score {detection.score:.3f}", font, width - 2 * pad),
        fill=BAND_TEXT_COLOUR,
        font=font,
    )

    y = header_h + 6
    for text in (f"source: {source}", f"time:   {_utc(ts)}"):
        draw.text((pad, y), _fit(draw, text, font, width - 2 * pad), fill=CARD_TEXT_COLOUR, font=font)
        y += line_h
    y += 4

    columns = 2
    col_w = (width - 2 * pad) // columns
    rows = max(0, (height - pad - y) // line_h)
    slots = rows * columns
    items = [f"{name} = {value:.4g}" for name, value in values.items()]
    if len(items) > slots > 0:
        items = items[: slots - 1] + [f"+{len(items) - slots + 1} more"]
    for i, text in enumerate(items[:slots]):
        col, row = divmod(i, rows)
        draw.text(
            (pad + col * col_w, y + row * line_h), _fit(draw, text, font, col_w - 8), fill=CARD_TEXT_COLOUR, font=font
        )
    return _encode(img, 85)
