"""What every builder shares: common flags, image-path handling, mask conversion, the run summary."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fclm.data.schema import relative_image_path
from fclm.io import ErrorReport, RecordError, write_jsonl
from fclm.masks import decode_mask, encode_mask, mask_to_box


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

    def field(self, rel: str, where: str) -> str:
        """The record's ``image`` for ``root/rel``; raises :class:`RecordError` if checked and missing."""
        path = self.root / rel
        key = str(path)
        if self.check:
            ok = self._seen.get(key)
            if ok is None:
                ok = self._seen[key] = path.is_file()
            if not ok:
                raise RecordError(where, f"image not found: {path}")
        return relative_image_path(path, self.out_dir)


def to_instance(segmentation: Any, height: int, width: int) -> tuple[dict, list[float], np.ndarray]:
    """COCO segmentation (polygons, RLE or uncompressed RLE) → ``(compressed RLE, mask box, mask)``.

    Raises ``ValueError`` for a polygon under 3 points, a corrupt RLE, a size that is not the
    image's, or an empty mask.
    """
    mask = decode_mask(segmentation, int(height), int(width))
    if not mask.any():
        raise ValueError("the mask is empty")
    return encode_mask(mask), mask_to_box(mask), mask


def write_records(out: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically (a killed build leaves no half-written file)."""
    return write_jsonl(out, records)


def load_json(path: str | os.PathLike, expect: type | None = None, what: str = "") -> Any:
    """Read a whole-input JSON file; a failure is fatal and raises :class:`RecordError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(str(path), f"cannot read ({type(e).__name__}: {e})") from None
    if expect is not None and not isinstance(data, expect):
        raise RecordError(str(path), f"expected {what or expect.__name__}, got {type(data).__name__}")
    return data
