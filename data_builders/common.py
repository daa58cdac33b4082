"""What every builder shares: common flags, image-path handling, mask conversion, the run summary."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fclm.data.schema import BOX_TOLERANCE, check_record, relative_image_path, xywh_to_xyxy
from fclm.io import ErrorReport, RecordError, read_json, write_jsonl
from fclm.masks import MAX_MASK_PIXELS, decode_mask, encode_mask, mask_to_box, rle_run_lengths

ENTRY_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RecursionError)
"""What a malformed entry of a parsed input can raise while a builder reads it (a wrong type, a missing
key, an infinite or huge number, nesting too deep to print): each is reported with the entry and skipped."""


@dataclass
class BuildResult:
    """What a builder did: records written to ``out`` and the problems it skipped (``report``)."""

    out: Path
    records: int
    report: ErrorReport
    counts: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        head = f"wrote {self.records} record(s) to {self.out}"
        if self.counts:
            head += " (" + ", ".join(f"{k}: {v}" for k, v in self.counts.items()) + ")"
        return head + "\n" + self.report.summary()


def add_common_args(p: argparse.ArgumentParser, *, images: bool = True) -> None:
    """``--strict`` (fail at the first bad input) and, for builders that check images, ``--no-check-images``."""
    p.add_argument("--strict", action="store_true", help="fail at the first bad input instead of reporting and skipping it")
    if images:
        p.add_argument(
            "--no-check-images",
            dest="check_images",
            action="store_false",
            help="do not check that each referenced image file exists",
        )


class ImageIndex:
    """Resolves an image file under a root and remembers whether it exists (one ``stat`` per file)."""

    def __init__(self, root: str | os.PathLike, out_dir: str | os.PathLike, *, check: bool = True):
        self.root = Path(root)
        self.out_dir = Path(out_dir)
        self.check = check
        self._seen: dict[str, bool] = {}
        self._sizes: dict[str, tuple[int, int] | None] = {}
        self._paths: dict[str, Path] = {}  # record ``image`` field → the file under root it came from

    def field(self, rel: str, where: str) -> str:
        """The record's ``image`` for ``root/rel``; raises :class:`RecordError` if checked and missing."""
        path = self.root / rel
        key = str(path)
        if self.check:
            ok = self._seen.get(key)
            if ok is None:
                try:
                    ok = path.is_file()
                except (OSError, ValueError):  # a name too long for the file system, a NUL byte …
                    ok = False
                self._seen[key] = ok
            if not ok:
                raise RecordError(where, f"image not found: {short_repr(str(path), 300)}")
        image = relative_image_path(path, self.out_dir)
        self._paths[image] = path
        return image

    def check_hw(self, image: str, height: int, width: int, where: str) -> None:
        """When checking: the file a record's ``image`` names must be ``height × width`` (the size its
        masks are rasterised at); read from the file's header once per file. ``RecordError`` otherwise."""
        if not self.check:
            return
        path = self._paths.get(image, self.out_dir / image)  # the output folder may not exist yet: no "out/.."
        key = str(path)
        if key not in self._sizes:
            from fclm.data.schema import image_size

            try:
                self._sizes[key] = image_size(path)
            except Exception:  # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError on a bad header
                self._sizes[key] = None
        hw = self._sizes[key]
        if hw is None:
            raise RecordError(where, f"cannot read the size of image {short_repr(str(path), 300)}")
        if hw != (height, width):
            raise RecordError(where, f"the annotation says the image is {height}×{width} (H×W) but {short_repr(image, 200)} is {hw[0]}×{hw[1]}")


def valid_id(v: Any) -> bool:
    """An id a builder can use in a record id and a message: a string of at most 1,000 characters or
    an integer (not a bool) within 64 bits (a 5,000-digit integer cannot even be printed)."""
    if isinstance(v, str):
        return len(v) <= 1000
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < (1 << 63)


def image_hw(height: Any, width: Any) -> tuple[int, int]:
    """An entry's image ``(height, width)`` as positive ints; ``ValueError`` for anything else.

    Integral floats (``480.0``) and numeric strings are accepted, as ``int()`` takes them; negative,
    zero, infinite, NaN or non-numeric sizes, and sizes over ``fclm.masks.MAX_MASK_PIXELS``, are refused.
    """
    try:
        if isinstance(height, bool) or isinstance(width, bool):
            raise TypeError
        h, w = int(height), int(width)
        if isinstance(height, float) and height != h or isinstance(width, float) and width != w:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"image size must be two positive integers, got height {short_repr(height)} and width {short_repr(width)}") from None
    if h <= 0 or w <= 0 or h * w > MAX_MASK_PIXELS:
        raise ValueError(f"image size {h}x{w} (HxW) is not positive or is over the {MAX_MASK_PIXELS}-pixel limit")
    return h, w


def short_repr(v: Any, limit: int = 40) -> str:
    """``repr(v)`` (``str`` for a string), cut to ``limit`` characters, for error messages."""
    try:
        text = v if isinstance(v, str) else repr(v)
    except RecursionError:
        return f"<{type(v).__name__}, nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_box(xywh: Any, height: int, width: int) -> list[float]:
    """COCO ``[x, y, w, h]`` → ``[x1, y1, x2, y2]``, refusing (``ValueError``) what the record check
    (:func:`fclm.data.schema.validate_record`) would: non-finite numbers, a negative size, a box that
    lies outside the ``width×height`` image by more than ``BOX_TOLERANCE`` pixels."""
    box = xywh_to_xyxy(xywh)
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"bbox {short_repr(xywh)} has a negative size")
    if min(box[0], box[1]) < -BOX_TOLERANCE or box[2] > width + BOX_TOLERANCE or box[3] > height + BOX_TOLERANCE:
        raise ValueError(f"bbox {short_repr(xywh)} lies outside the {width}x{height} (WxH) image")
    return box


def to_instance(segmentation: Any, height: Any, width: Any) -> tuple[dict, list[float], np.ndarray]:
    """COCO segmentation (polygons, RLE or uncompressed RLE) → ``(compressed RLE, mask box, mask)``.

    Raises ``ValueError`` for a bad image size (:func:`image_hw`), a polygon under 3 points or with
    non-finite / far-out coordinates, a corrupt or oversized RLE, a size that is not the image's, or
    an empty mask (all checked by :mod:`fclm.masks` before pycocotools sees the data).
    """
    h, w = image_hw(height, width)
    mask = decode_mask(segmentation, h, w)
    if not mask.any():
        raise ValueError("the mask is empty")
    return encode_mask(mask), mask_to_box(mask), mask


def mask_problem(m: Any, hw: tuple[int, int] | None) -> str | None:
    """Why a record's mask is unusable (``None`` if it is fine), without decoding a compressed RLE.

    RLE: ``size`` positive ints within ``MAX_MASK_PIXELS`` and equal to the image's ``hw`` (when
    known); run lengths (:func:`fclm.masks.rle_run_lengths`, vectorised) non-negative, covering H×W,
    with a foreground pixel. Polygons are rasterised through :mod:`fclm.masks` when ``hw`` is known.
    """
    if isinstance(m, dict):
        size, counts = m.get("size"), m.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            return "bad RLE (size must be [H, W] with positive ints)"
        h, w = int(size[0]), int(size[1])
        if h * w > MAX_MASK_PIXELS:
            return f"bad RLE (size {h}x{w} is over the {MAX_MASK_PIXELS}-pixel limit)"
        if hw is not None and (h, w) != tuple(hw):
            return f"mask size {[h, w]} differs from the image size {list(hw)}"
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                return "bad RLE (uncompressed counts must be non-negative ints)"
            runs = np.asarray(counts, dtype=object)
        elif isinstance(counts, str):
            try:
                runs = rle_run_lengths(counts)
            except ValueError:  # not ASCII
                return "bad RLE (counts are not a COCO run-length string)"
            if (runs < 0).any():
                return "bad RLE (counts are not a valid COCO run-length string)"
        else:
            return "bad RLE (counts must be a string or a list)"
        if int(runs.sum()) != h * w:
            return f"bad RLE (runs cover {int(runs.sum())} pixels, expected H*W = {h * w})"
        if not any(int(r) > 0 for r in runs[1::2]):
            return "the mask is empty"
        return None
    if isinstance(m, list):
        if hw is None:
            return None  # as the record check does: a polygon's size is unknown without the image
        try:
            return None if decode_mask(m, *hw).any() else "the mask is empty"
        except (ValueError, TypeError) as e:
            return f"bad polygon ({e})"
    return f"a mask must be an RLE object or a polygon list, got {type(m).__name__}"


class RecordGate:
    """The last check before a record is written: the record schema (:func:`fclm.data.schema.check_record`
    without decoding masks: placeholders, ``[SEG]`` count, boxes inside the masks' size …) and an id
    not used before. A record that fails is reported at ``where`` (its input) and not written, so a
    hostile input can never make a builder write an invalid record.
    """

    def __init__(self, report: ErrorReport):
        self.report = report
        self.seen: set[str] = set()

    def __call__(self, where: str, rec: dict) -> bool:
        problems = check_record(rec, decode_masks=False)
        rid = rec.get("id")
        if isinstance(rid, str) and rid in self.seen:
            problems.append(f"id {rid!r} is already used by an earlier record (the input repeats an entry or an id)")
        if problems:
            self.report.add(RecordError(where, "; ".join(problems)))
            return False
        self.seen.add(rid)
        return True


def write_records(out: str | os.PathLike, records: Iterable[Any], report: ErrorReport | None = None, *, located: bool = False) -> int:
    """Write records atomically (a killed build leaves no half-written file).

    Records are strict JSON (no NaN/Infinity). With ``report``, a record that cannot be written (a
    lone surrogate or a NaN from the input, nesting too deep) is reported and skipped; the others
    are written. ``located``: ``records`` are ``(where, record)`` pairs and such a problem names
    ``where`` (the input entry), else the record id.
    """
    return write_jsonl(out, records, report=report, allow_nan=False, located=located)


def load_json(path: str | os.PathLike, expect: type | None = None, what: str = "") -> Any:
    """Read a whole-input JSON file; a failure is fatal and raises a one-line :class:`RecordError`
    naming the file (with the byte offset and line of invalid UTF-8, the line/column of bad JSON)."""
    data = read_json(path)
    if expect is not None and not isinstance(data, expect):
        raise RecordError(str(path), f"expected {what or expect.__name__}, got {type(data).__name__}")
    return data
