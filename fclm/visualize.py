"""Draw an :class:`~fclm.inference.predictor.Answer` over its image, for people to look at.

What :func:`overlay` draws, in this order:

* the image, upscaled by a whole factor (nearest neighbour, so pixels stay square and masks line up
  exactly) until it is at least :data:`MIN_WIDTH` pixels wide, so that small images stay legible;
* per ``[SEG]`` segment k, the union of its instances' masks blended with colour ``PALETTE[k]``
  (:data:`FILL_ALPHA`), the mask's edge in that solid colour, each instance's box as a rectangle in
  that colour, and a tag with k at the box's top-left corner;
* the input regions (``answer.regions``, the masks the region prompts became) as outlines only,
  dashed white and black so that they show on any image and never hide the segments;
* a white legend strip below the image: per segment a swatch with k, its phrase (``[SEG] k`` when
  the phrase is empty), its instance count and scores; per input region its kind and how its mask
  was made; then the answer text, wrapped to the strip's width.

:func:`save_overlay` writes it as PNG, atomically (:func:`fclm.io.atomic_write`). ``fclm-chat``
(``infer/chat.py``) uses both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fclm.inference.predictor import Answer
from fclm.io import atomic_write

__all__ = ["FILL_ALPHA", "MIN_WIDTH", "PALETTE", "overlay", "save_overlay", "segment_color"]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)
"""Segment colours (Sasha Trubetskoy's distinct colours, the most separable first); cycled past ten."""
FILL_ALPHA = 0.45
"""Weight of a segment's colour inside its mask (the image keeps the rest, so it stays readable)."""
MIN_WIDTH = 512
"""Images narrower than this are upscaled by a whole factor until they are at least this wide."""
MAX_SIDE = 4096
"""The upscaling never makes either side longer than this (a very tall, narrow image stays bounded)."""

_REGION_DASH = (255, 255, 255), (0, 0, 0)


def segment_color(k: int) -> tuple[int, int, int]:
    """The colour of the k-th segment (0-based) in :func:`overlay`."""
    return PALETTE[k % len(PALETTE)]


def _scale(height: int, width: int) -> int:
    scale = max(1, math.ceil(MIN_WIDTH / width))
    return max(1, min(scale, MAX_SIDE // max(height, width)))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _drawable(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """Text the font can draw: control characters become spaces; the bitmap font only takes Latin-1."""
    text = "".join(" " if ord(c) < 32 else c for c in text)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    return text


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is cut by characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in _drawable(paragraph, font).split(" "):
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width:
                cut = 1
                while cut < len(word) and font.getlength(word[: cut + 1]) <= width:
                    cut += 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _edges(mask: np.ndarray, thickness: int) -> np.ndarray:
    """The pixels of ``mask`` within ``thickness`` of its outside (the image border counts as outside)."""
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _upscale(mask: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(mask, dtype=bool), scale, axis=0), scale, axis=1)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: list[float], dashes: int = 6) -> None:
    x1, y1, x2, y2 = box
    for j in range(dashes):
        colour = _REGION_DASH[1] if j % 2 else (170, 170, 170)  # grey for white: white would vanish on the white strip
        xa, xb = x1 + (x2 - x1) * j / dashes, x1 + (x2 - x1) * (j + 1) / dashes
        ya, yb = y1 + (y2 - y1) * j / dashes, y1 + (y2 - y1) * (j + 1) / dashes
        draw.line([(xa, y1), (xb, y1)], fill=colour, width=2)
        draw.line([(xa, y2), (xb, y2)], fill=colour, width=2)
        draw.line([(x1, ya), (x1, yb)], fill=colour, width=2)
        draw.line([(x2, ya), (x2, yb)], fill=colour, width=2)


def _format_scores(scores: list[float]) -> str:
    shown = ", ".join(f"{s:.2f}" for s in scores[:5])
    return shown + (f", … ({len(scores) - 5} more)" if len(scores) > 5 else "")


def overlay(image: Image.Image, answer: Answer, *, regions: bool = True) -> Image.Image:
    """The image with the answer's segments, boxes and (``regions``) input regions drawn, and a legend below.

    Raises ``ValueError`` when ``image`` is not the size the answer was made for (``answer.image_size``).
    """
    rgb = image.convert("RGB")
    h, w = rgb.height, rgb.width
    if tuple(answer.image_size) != (h, w):
        ah, aw = answer.image_size
        raise ValueError(f"the answer is for a {aw}×{ah} image, but the image is {w}×{h}")
    s = _scale(h, w)
    big_w, big_h = w * s, h * s
    line_width = max(3, big_w // 200)
    canvas = np.array(rgb.resize((big_w, big_h), Image.NEAREST))

    # fills first, then every edge, so that a later segment's fill never hides an earlier one's edge
    unions = [_upscale(seg.union(h, w), s) for seg in answer.segments]
    for k, union in enumerate(unions):
        blended = (1 - FILL_ALPHA) * canvas[union] + FILL_ALPHA * np.asarray(segment_color(k), np.float32)
        canvas[union] = np.round(blended).astype(np.uint8)
    for k, union in enumerate(unions):
        canvas[_edges(union, line_width)] = segment_color(k)
    if regions:
        dash_length = max(4, 3 * line_width)
        for region in answer.regions:
            ys, xs = np.nonzero(_edges(_upscale(region.mask, s), line_width))
            white = ((ys + xs) // dash_length) % 2 == 0  # dashes run diagonally, so every side of a shape is dashed
            canvas[ys[white], xs[white]] = _REGION_DASH[0]
            canvas[ys[~white], xs[~white]] = _REGION_DASH[1]
    picture = Image.fromarray(canvas)

    font_size = max(14, big_w // 64)
    font = _font(font_size)
    draw = ImageDraw.Draw(picture)
    for k, seg in enumerate(answer.segments):
        colour = segment_color(k)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        for inst in seg.instances:
            x1, y1, x2, y2 = (v * s for v in inst.box)
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=line_width)
            tag = str(k + 1)
            tx, ty = min(x1, big_w - 1), min(y1, big_h - 1)
            _, _, right, bottom = draw.textbbox((tx + 3, ty + 1), tag, font=font)
            draw.rectangle([tx, ty, right + 3, bottom + 2], fill=colour)
            draw.text((tx + 3, ty + 1), tag, fill=ink, font=font)

    # ---- legend: (swatch, text lines) rows, then the answer text
    pad = font_size // 2 + 4
    ascent, descent = font.getmetrics() if isinstance(font, ImageFont.FreeTypeFont) else (font_size, 2)
    line_h = ascent + descent + 4
    swatch = line_h - 2
    text_w = big_w - 3 * pad - swatch
    rows: list[tuple[str, tuple[int, int, int] | None, list[str]]] = []
    for k, seg in enumerate(answer.segments):
        label = f'"{seg.phrase}"' if seg.phrase else f"[SEG] {k + 1}"
        n = len(seg.instances)
        what = "no mask" if n == 0 else f"{n} instance{'s' * (n != 1)}, score {_format_scores([i.score for i in seg.instances])}"
        if seg.exists is not None:
            what += f", exists {seg.exists:.2f}"
        rows.append((str(k + 1), segment_color(k), _wrap(f"{label} ({seg.head}): {what}", font, text_w)))
    if regions:
        for i, region in enumerate(answer.regions):
            how = {"given": "as given", "sam": "mask by SAM", "fallback": "SAM gave nothing: the prompt's own shape"}.get(region.source, region.source)
            rows.append(("", None, _wrap(f"input region {i + 1} ({region.kind}): {how}", font, text_w)))
    text = answer.text if answer.text else "(empty answer)"
    if answer.finish_reason == "length":
        text += " [cut at the token budget]"
    answer_lines = _wrap(f"Answer: {text}", font, big_w - 2 * pad)
    legend_h = pad + sum(len(lines) * line_h + 4 for _, _, lines in rows) + len(answer_lines) * line_h + pad

    out = Image.new("RGB", (big_w, big_h + legend_h), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.line([(0, big_h), (big_w, big_h)], fill=(128, 128, 128), width=1)
    y = big_h + pad
    for tag, colour, lines in rows:
        box = [pad, y + 1, pad + swatch, y + swatch]
        if colour is not None:
            draw.rectangle(box, fill=colour, outline=(0, 0, 0))
            ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
            left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)  # centred by hand: bitmap fonts take no anchor
            draw.text(((box[0] + box[2] - left - right) / 2, (box[1] + box[3] - top - bottom) / 2), tag, fill=ink, font=font)
        else:  # an input region: a dashed outline, as on the image
            _dashed_rectangle(draw, box)
        for line in lines:
            draw.text((2 * pad + swatch, y), line, fill=(0, 0, 0), font=font)
            y += line_h
        y += 4
    for line in answer_lines:
        draw.text((pad, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    return out


def save_overlay(path: str | os.PathLike, image: Image.Image, answer: Answer, *, regions: bool = True) -> Path:
    """Write :func:`overlay` of ``answer`` on ``image`` to ``path`` as PNG (atomically); return the path."""
    picture = overlay(image, answer, regions=regions)
    with atomic_write(path, "wb") as f:
        picture.save(f, format="PNG")
    return Path(path)
