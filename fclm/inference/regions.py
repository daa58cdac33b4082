"""Region prompts of every kind → the binary mask the Hybrid Region Extractor reads.

A region can be given as:

* a mask: a boolean H×W array (numpy or torch), ``{"mask": RLE | polygons}``;
* a box: ``{"box": [x1, y1, x2, y2]}`` (absolute pixels of the original image);
* clicks: ``{"points": [[x, y], …], "labels": [1, 0, …]}`` (1 positive, 0 negative; default all positive);
* a scribble: ``{"scribble": [[x, y], [x, y], …]}`` (a polyline).

Boxes, clicks and scribbles become masks through SAM's prompt encoder and mask decoder on the cached
image embedding, as ``segment_anything.SamPredictor`` does (coordinates scaled into the SAM frame like
``ResizeLongestSide.apply_coords``); points alone ask SAM for three candidates and keep the one with
the highest predicted IoU. SAM takes no scribble prompt, so a scribble is sampled into
:data:`SCRIBBLE_POINTS` positive clicks evenly spaced along its length (its vertices' path).

If SAM returns an empty mask (an untrained or random SAM can), the prompt's own shape is used instead —
the box filled, a disc around each positive click, the scribble's stroke — and the region says
``source="fallback"``, so a caller can see that SAM did not segment it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from fclm.masks import decode_mask

__all__ = ["RegionPrompt", "ResolvedRegion", "parse_region", "SCRIBBLE_POINTS"]

SCRIBBLE_POINTS = 8
"""Positive clicks sampled along a scribble."""
MAX_CLICKS = 64
"""Most clicks in one points region (SAM attends over every click: cost grows with their square)."""
MAX_SCRIBBLE_VERTICES = 4096
"""Most vertices of one scribble (it is resampled to :data:`SCRIBBLE_POINTS` clicks)."""
FALLBACK_RADIUS = 0.03
"""Radius of a click's fallback disc and half-width of a scribble's stroke, as a fraction of the shorter side."""


@dataclass
class RegionPrompt:
    """One region as the user gave it (``kind`` is ``mask``, ``box``, ``points`` or ``scribble``)."""

    kind: str
    mask: np.ndarray | None = None
    box: list[float] | None = None
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class ResolvedRegion:
    """The mask a region prompt became (what the model was shown), with how it was made.

    Attributes:
        mask: H×W bool at the original image size.
        kind: the prompt's kind; source: ``given`` (a mask), ``sam`` (decoded by SAM), ``fallback``.
        score: SAM's predicted IoU for ``sam`` masks, else None.
        prompt: the prompt as given (box / points / scribble coordinates), JSON-friendly.
    """

    mask: np.ndarray
    kind: str
    source: str
    score: float | None = None
    prompt: dict = field(default_factory=dict)


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _point(p: Any, what: str, height: int, width: int) -> list[float]:
    if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise ValueError(f"{what} must be [x, y], got {p!r}")
    x, y = _number(p[0], f"{what} x"), _number(p[1], f"{what} y")
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"{what} ({x:g}, {y:g}) lies outside the {width}×{height} image")
    return [x, y]


def parse_region(region: Any, index: int, height: int, width: int) -> RegionPrompt:
    """Check one region prompt against an H×W image; ``ValueError`` names ``region {index+1}`` and the problem."""
    name = f"region {index + 1}"
    if isinstance(region, (np.ndarray, torch.Tensor)):
        region = {"mask": np.asarray(region.cpu() if isinstance(region, torch.Tensor) else region)}
    if not isinstance(region, dict):
        raise ValueError(f"{name}: expected a mask array or an object with mask, box, points or scribble; got {type(region).__name__}")
    kinds = [k for k in ("mask", "box", "points", "scribble") if k in region]
    if len(kinds) != 1:
        raise ValueError(f"{name}: give exactly one of mask, box, points, scribble (got {kinds or 'none'})")
    kind = kinds[0]
    value = region[kind]
    if kind == "mask":
        if isinstance(value, (np.ndarray, torch.Tensor)):
            mask = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
            if mask.shape != (height, width):
                raise ValueError(f"{name}: mask of shape {mask.shape} does not match the {width}×{height} image (H×W = {height}×{width})")
            mask = mask.astype(bool)
        else:
            try:
                mask = decode_mask(value, height, width)
            except (ValueError, TypeError, OverflowError) as e:
                raise ValueError(f"{name}: {e}") from None
        if not mask.any():
            raise ValueError(f"{name}: the mask is empty")
        return RegionPrompt(kind="mask", mask=mask)
    if kind == "box":
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise ValueError(f"{name}: box must be [x1, y1, x2, y2], got {value!r}")
        x1, y1, x2, y2 = (_number(v, f"{name} box coordinate") for v in value)
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"{name}: box {list(value)} needs x1 < x2 and y1 < y2 ([x1, y1, x2, y2] in pixels)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ValueError(f"{name}: box {list(value)} lies outside the {width}×{height} image")
        return RegionPrompt(kind="box", box=[x1, y1, x2, y2])
    if kind == "points":
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{name}: points must be a non-empty list of [x, y]")
        if len(value) > MAX_CLICKS:
            raise ValueError(f"{name}: {len(value)} points, more than {MAX_CLICKS}")
        points = [_point(p, f"{name} point {j + 1}", height, width) for j, p in enumerate(value)]
        labels = region.get("labels", [1] * len(points))
        if not isinstance(labels, (list, tuple)) or len(labels) != len(points) or any(lab not in (0, 1) or isinstance(lab, bool) for lab in labels):
            raise ValueError(f"{name}: labels must be one 1 (positive) or 0 (negative) per point, got {labels!r}")
        if 1 not in labels:
            raise ValueError(f"{name}: at least one point must be positive (label 1)")
        return RegionPrompt(kind="points", points=points, labels=[int(lab) for lab in labels])
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}: scribble must be a non-empty list of [x, y]")
    if len(value) > MAX_SCRIBBLE_VERTICES:
        raise ValueError(f"{name}: a scribble of {len(value)} vertices, more than {MAX_SCRIBBLE_VERTICES}")
    points = [_point(p, f"{name} scribble point {j + 1}", height, width) for j, p in enumerate(value)]
    return RegionPrompt(kind="scribble", points=points, labels=[1] * len(points))


def sample_polyline(points: Sequence[Sequence[float]], n: int = SCRIBBLE_POINTS) -> list[list[float]]:
    """``n`` points evenly spaced by length along a polyline (its ends included); one point stays one."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) == 1:
        return [pts[0].tolist()]
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    total = float(seg.sum())
    if total == 0:
        return [pts[0].tolist()]
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    out = []
    for d in np.linspace(0.0, total, n):
        k = min(int(np.searchsorted(cum, d, side="right")) - 1, len(seg) - 1)
        t = 0.0 if seg[k] == 0 else (d - cum[k]) / seg[k]
        out.append((pts[k] + t * (pts[k + 1] - pts[k])).tolist())
    return out


def fallback_mask(prompt: RegionPrompt, height: int, width: int) -> np.ndarray:
    """The prompt's own shape as a mask: the box filled, discs around positive clicks, the scribble's stroke."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    r = max(1.0, FALLBACK_RADIUS * min(height, width))
    if prompt.kind == "box":
        x1, y1, x2, y2 = prompt.box
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], fill=1)
    else:
        positives = [p for p, lab in zip(prompt.points, prompt.labels) if lab == 1]
        if prompt.kind == "scribble" and len(positives) > 1:
            draw.line([tuple(p) for p in positives], fill=1, width=max(1, int(round(2 * r))))
        for x, y in positives:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    return np.asarray(canvas, dtype=bool)


def resolve_region(
    prompt: RegionPrompt,
    *,
    height: int,
    width: int,
    sam_decode: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    to_frame: Callable[[np.ndarray], np.ndarray],
    to_image: Callable[[torch.Tensor], torch.Tensor],
) -> ResolvedRegion:
    """A parsed prompt → its mask at the original size.

    Arguments:
        sam_decode: ``SamBackend.decode_prompts`` bound to the image's embedding (keyword ``points``,
            ``point_labels``, ``box`` as frame-pixel tensors).
        to_frame: original-pixel coordinates (…×2 array of x, y) → SAM-frame pixels.
        to_image: low-res logits (M×Hl×Wl) → logits at the original size (M×H×W).
    """
    if prompt.kind == "mask":
        return ResolvedRegion(mask=prompt.mask, kind="mask", source="given")
    if prompt.kind == "box":
        corners = to_frame(np.asarray(prompt.box, dtype=np.float64).reshape(2, 2)).reshape(4)
        low, iou = sam_decode(box=torch.tensor(corners, dtype=torch.float32))
        described = {"box": list(prompt.box)}
    else:
        points = sample_polyline(prompt.points) if prompt.kind == "scribble" else prompt.points
        labels = [1] * len(points) if prompt.kind == "scribble" else prompt.labels
        frame = to_frame(np.asarray(points, dtype=np.float64))
        low, iou = sam_decode(points=torch.tensor(frame, dtype=torch.float32), point_labels=torch.tensor(labels))
        described = {"scribble": prompt.points} if prompt.kind == "scribble" else {"points": prompt.points, "labels": prompt.labels}
    best = int(torch.argmax(iou))
    mask = (to_image(low[best : best + 1])[0] > 0).cpu().numpy()
    if mask.any():
        return ResolvedRegion(mask=mask, kind=prompt.kind, source="sam", score=float(iou[best]), prompt=described)
    return ResolvedRegion(mask=fallback_mask(prompt, height, width), kind=prompt.kind, source="fallback", prompt=described)
