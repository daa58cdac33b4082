"""Image helpers of the processor and inference: loading as RGB, the SAM frame, region crops, cache keys.

SAM frame (size S): the image resized so its longest side is S with PIL bilinear (as
``segment_anything.utils.transforms.ResizeLongestSide``), normalised with SAM's pixel mean/std,
zero-padded bottom/right. Masks are resized with the same bilinear filter and thresholded at 0.5; a
non-empty mask that would vanish keeps its highest-coverage pixels.

:func:`to_rgb` and :func:`load_image` are also importable from :mod:`fclm.processor`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from fclm.io import RecordError

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# device explicit: a first import inside ``with torch.device("meta")`` (a model built on meta) must not put them there
_SAM_MEAN = torch.tensor(SAM_PIXEL_MEAN, device="cpu").view(3, 1, 1)
_SAM_STD = torch.tensor(SAM_PIXEL_STD, device="cpu").view(3, 1, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparency is composited on white (as qwen-vl-utils ``to_rgb``)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return image.convert("RGB")


def load_image(path: str | Path, record_id: str | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB.

    Raises :class:`~fclm.io.RecordError` (a ``ValueError``) naming the record and the file when the file
    is missing, unreadable, truncated or not an image.
    """
    where = f"record {record_id!r}" if record_id is not None else str(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise RecordError(where, f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RecordError(where, f"cannot read image {path}: {type(e).__name__}: {e}") from None


def sha1_key(*parts: str | bytes) -> str:
    """Hex SHA-1 of ``parts``, each followed by a NUL byte (cache keys of images and crops)."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def sam_signature(size: int) -> str:
    """What the SAM embedding of an image depends on besides its pixels."""
    return f"sam-frame:{size}:pil-bilinear:mean{SAM_PIXEL_MEAN}:std{SAM_PIXEL_STD}:pad-br"


def sam_resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Size of an image inside the SAM frame of side ``size`` (``ResizeLongestSide.get_preprocess_shape``)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_preprocess(image: Image.Image, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image → (3×S×S normalised, zero-padded SAM input, (h, w) of the resized image inside it)."""
    nh, nw = sam_resize_shape(image.height, image.width, size)
    resized = image.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)
    x = (x - _SAM_MEAN) / _SAM_STD
    out = torch.zeros((3, size, size), dtype=torch.float32)
    out[:, :nh, :nw] = x
    return out, (nh, nw)


def mask_to_frame(mask: np.ndarray, resized_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Boolean H×W mask → S×S float {0,1} in the SAM frame (side ``size``) of an image resized to ``resized_hw``.

    Bilinear resize (the image's filter) thresholded at 0.5; a non-empty mask that would vanish
    keeps its highest-coverage pixels.
    """
    nh, nw = resized_hw
    if mask.shape == (nh, nw):
        m = mask.astype(bool)
    else:
        soft = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((nw, nh), Image.BILINEAR))
        m = soft >= 0.5
        if not m.any() and mask.any() and soft.max() > 0:
            m = soft >= soft.max()
    out = torch.zeros((size, size), dtype=torch.float32)
    out[:nh, :nw] = torch.from_numpy(m.astype(np.float32))
    return out


def crop_box(box: Sequence[float], height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """Integer crop ``(x1, y1, x2, y2)``: ``box`` enlarged by ``margin`` × its width/height per side, clipped."""
    x1, y1, x2, y2 = box
    mx = margin * (x2 - x1)
    my = margin * (y2 - y1)
    cx1 = max(0, math.floor(x1 - mx))
    cy1 = max(0, math.floor(y1 - my))
    cx2 = min(width, math.ceil(x2 + mx))
    cy2 = min(height, math.ceil(y2 + my))
    return cx1, cy1, cx2, cy2
