"""Masks and boxes: COCO RLE / polygons via pycocotools, and box conventions.

Conventions used across FCLM:
* masks are boolean ``H×W`` numpy arrays (or ``uint8`` where pycocotools wants them);
* a mask on disk is COCO RLE ``{"size": [H, W], "counts": str}`` (compressed, as written by
  :func:`encode_mask`); uncompressed RLE (``counts`` a list of ints) and polygons
  (a list of flat ``[x0, y0, x1, y1, …]`` lists) are accepted on input;
* boxes are absolute pixel ``[x1, y1, x2, y2]`` with ``x2 = x + w`` (pycocotools ``toBbox``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

MAX_MASK_PIXELS = 1 << 28
"""Largest H×W a mask may declare (268 M pixels). Checked before pycocotools allocates anything: a corrupt
or hostile size must be an error, not an out-of-memory kill."""
MAX_POLYGON_PERIMETER = 1e6
"""Largest perimeter (pixels) of one polygon: pycocotools rasterises an edge as ~5 points per pixel of length."""


def encode_mask(mask: np.ndarray) -> dict:
    """Encode a boolean ``H×W`` mask as compressed COCO RLE with a ``str`` counts field."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _to_coco_rle(rle: dict) -> dict:
    """Validate an RLE dict and return the form pycocotools takes (compressed, bytes counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"RLE size must be [H, W] with positive ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h * w > MAX_MASK_PIXELS:
        raise ValueError(f"RLE size {h}×{w} is larger than the {MAX_MASK_PIXELS}-pixel limit (fclm.masks.MAX_MASK_PIXELS)")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        if sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected H*W = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be str, bytes or a list, got {type(counts).__name__}")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: dict) -> np.ndarray:
    """Decode COCO RLE (compressed or uncompressed) to a boolean ``H×W`` mask.

    Raises ``ValueError`` for a malformed RLE (bad size, counts that do not cover ``H×W``).
    """
    coco = _to_coco_rle(rle)
    h, w = coco["size"]
    # pycocotools silently truncates/pads corrupt compressed strings: check the run lengths cover H×W
    # (before decoding, so that a corrupt size cannot make it allocate a huge mask).
    if isinstance(coco["counts"], bytes):
        runs = rle_run_lengths(coco["counts"])
        if (runs < 0).any():
            raise ValueError("corrupt RLE counts (not a valid COCO run-length string)")
        if int(runs.sum()) != h * w:
            raise ValueError(f"corrupt RLE counts (runs cover {int(runs.sum())} pixels, expected H*W = {h * w})")
    try:
        m = mask_utils.decode(coco)
    except Exception as e:  # pycocotools raises bare exceptions for corrupt strings
        raise ValueError(f"corrupt RLE counts ({e})") from None
    if m.shape != (h, w):
        raise ValueError(f"RLE decodes to {m.shape}, expected {(h, w)}")
    return m.astype(bool)


def rle_run_lengths(counts: bytes | str) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (vectorised ``rleFrString`` of the COCO API).

    Each run is a little-endian base-32 number in characters ``48 + v``; bit 0x20 continues it,
    bit 0x10 of the last character makes it negative; from the 4th run on, the run two before is
    added. A valid RLE has non-negative runs summing to ``H·W``.
    """
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if (c < 0).any() or (c > 63).any():
        return np.full(1, -1, dtype=np.int64)  # characters outside the alphabet: corrupt
    last = (c & 0x20) == 0
    if not last[-1]:
        return np.full(1, -1, dtype=np.int64)  # the final number is cut off
    group = np.concatenate([[0], np.cumsum(last[:-1])])
    starts = np.concatenate([[0], np.nonzero(last[:-1])[0] + 1])
    k = np.arange(c.size) - starts[group]
    if k.max() > 12:  # more than 60 bits: not a run length
        return np.full(1, -1, dtype=np.int64)
    x = np.zeros(group[-1] + 1, dtype=np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    ends = np.nonzero(last)[0]
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(np.int64(1), 5 * (k[ends][negative] + 1))
    runs = x.copy()
    if runs.size > 3:
        runs[3::2] = np.cumsum(x[1::2])[1:]  # odd runs from the 4th on: + run two before
    if runs.size > 4:
        runs[4::2] = np.cumsum(x[2::2])[1:]  # even runs from the 5th on
    return runs


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """Rasterise COCO polygons (flat ``[x0, y0, x1, y1, …]`` lists) into one compressed RLE.

    Each polygon needs at least 3 points (6 numbers); otherwise ``ValueError``.
    """
    if not polygons:
        raise ValueError("empty polygon list")
    if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
            and 0 < height and 0 < width and int(height) * int(width) <= MAX_MASK_PIXELS):
        raise ValueError(f"polygon masks need a positive image size within {MAX_MASK_PIXELS} pixels, got {height}×{width}")
    height, width = int(height), int(width)
    # pycocotools' rasteriser works in 32-bit integers on coordinates ×5: a non-finite or huge coordinate
    # crashes the process. Points may lie outside the image (annotations drift) but not far outside.
    bound = 2.0 * max(height, width) + 64.0
    polys = []
    for i, p in enumerate(polygons):
        if not isinstance(p, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p):
            raise ValueError(f"polygon {i} must be a flat list of numbers [x0, y0, x1, y1, …]")
        p = [float(v) for v in p]
        if len(p) < 6 or len(p) % 2:
            raise ValueError(f"polygon {i} has {len(p) / 2:g} points; at least 3 (x, y) pairs are needed")
        if not all(math.isfinite(v) and -bound <= v <= bound for v in p):
            raise ValueError(f"polygon {i} has a coordinate that is not finite or lies far outside the {width}×{height} image")
        xy = np.asarray(p).reshape(-1, 2)
        perimeter = float(np.linalg.norm(np.diff(np.vstack([xy, xy[:1]]), axis=0), axis=1).sum())
        if perimeter > MAX_POLYGON_PERIMETER:
            raise ValueError(f"polygon {i} has a perimeter of {perimeter:.3g} px, more than {MAX_POLYGON_PERIMETER:g}")
        polys.append(p)
    rles = mask_utils.frPyObjects(polys, int(height), int(width))
    rle = mask_utils.merge(rles)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def decode_mask(obj: Any, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode an RLE dict or a polygon list to a boolean mask.

    ``height``/``width`` are required for polygons; for RLE they are checked against its size.
    """
    if isinstance(obj, dict):
        size = obj.get("size")
        if height is not None and width is not None and isinstance(size, (list, tuple)) and list(size) != [height, width]:
            # checked before decoding: a wrong (possibly huge) size is never allocated
            raise ValueError(f"mask size {list(size)} differs from image size {[height, width]}")
        return decode_rle(obj)
    if isinstance(obj, (list, tuple)):
        if height is None or width is None:
            raise ValueError("polygon masks need the image height and width")
        return decode_rle(polygons_to_rle(obj, height, width))
    raise ValueError(f"a mask must be an RLE dict or a polygon list, got {type(obj).__name__}")


def mask_to_box(mask: np.ndarray) -> list[float]:
    """Tight ``[x1, y1, x2, y2]`` box of a boolean mask (``x2 = max column + 1``); ``[0,0,0,0]`` if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def union_masks(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Union of boolean masks; an all-false ``height×width`` mask when ``masks`` is empty."""
    out = np.zeros((height, width), dtype=bool)
    for m in masks:
        out |= m
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (LISA's convention for an empty union)."""
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(inter) / float(union)
