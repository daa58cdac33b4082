"""Tiny fixtures in each source format, built by the tests themselves (no downloads).

A uniquely named helper module (not ``conftest.py``) so that ``from builder_fixtures import …`` can
never pick up another folder's conftest."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def write_image(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
    return path


def poly_rect(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def coco_decode(segm, h: int, w: int) -> np.ndarray:
    """Reference decode with pycocotools alone (as the official refer API does)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool)


def rle_of(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (``counts`` a list of run lengths, column-major, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


class Boom:
    """Unpickling this would run code (creates the file named in its argument)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def refer_fixture(root: Path, dataset: str = "refcoco", refs_name: str = "refs(unc).p", refs: list | None = None,
                  extra_anns: list | None = None, as_json: bool = False) -> dict:
    """A refer-format dataset: 2 images, 3 object annotations (polygons, one RLE), refs over 3 splits."""
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    write_image(img_dir / "COCO_train2014_000000000001.jpg", 40, 60, seed=1)
    write_image(img_dir / "COCO_train2014_000000000002.jpg", 50, 30, seed=2)
    m3 = np.zeros((50, 30), bool)
    m3[10:30, 5:20] = True
    images = [
        {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 60},
        {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 50, "width": 30},
    ]
    anns = [
        {"id": 101, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 20, 10],
         "segmentation": [poly_rect(5, 5, 20, 10), [30, 20, 40, 20, 35, 30]]},
        {"id": 102, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [40, 10, 15, 25], "segmentation": [poly_rect(40, 10, 15, 25)]},
        {"id": 201, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [5, 10, 15, 20],
         "segmentation": uncompressed_rle(m3)},
    ] + (extra_anns or [])
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "car_(automobile)"}]
    if refs is None:
        refs = [
            {"ref_id": 0, "ann_id": 101, "image_id": 1, "category_id": 1, "split": "train", "file_name": "COCO_train2014_000000000001_101.jpg",
             "sentences": [{"sent_id": 0, "sent": "left man", "raw": "Left man.", "tokens": ["left", "man"]},
                           {"sent_id": 1, "sent": "man on the left", "raw": "Man on the left", "tokens": []}]},
            {"ref_id": 1, "ann_id": 102, "image_id": 1, "category_id": 2, "split": "val", "file_name": "x.jpg",
             "sentences": [{"sent_id": 2, "sent": "red car", "raw": "red car", "tokens": []}]},
            {"ref_id": 2, "ann_id": 201, "image_id": 2, "category_id": 1, "split": "testA", "file_name": "y.jpg",
             "sentences": [{"sent_id": 3, "sent": "person", "raw": "person", "tokens": []}]},
        ]
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    if as_json:
        with open(folder / refs_name, "w") as f:
            json.dump(refs, f)
    else:
        with open(folder / refs_name, "wb") as f:
            pickle.dump(refs, f, protocol=2)  # the official files were written by Python 2 (protocol <= 2)
    return {"images": {i["id"]: i for i in images}, "anns": {a["id"]: a for a in anns}, "refs": refs, "img_dir": img_dir}


def run_cli_isolated(*argv: str, timeout: float = 30, extra_mb: int = 1024):
    """``python -m data_builders ARGV`` in a child process with a memory cap and a timeout.

    For inputs that once crashed the process (pycocotools on hostile masks), hung or allocated
    gigabytes: a segfault, a hang or a runaway allocation fails the calling test instead of killing
    pytest or the machine. Returns the ``CompletedProcess`` (text stdout/stderr)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import re, resource, sys
        import data_builders.__main__ as cli
        import numpy, pycocotools.mask, PIL.Image  # loaded before the cap is set
        vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + ({extra_mb} << 20), resource.RLIM_INFINITY))
        sys.exit(cli.main({list(argv)!r}))
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        import pytest

        pytest.fail(f"fclm-data {' '.join(argv)} still running after {timeout} s")
