"""ShapesRef: a generated image set with records for every task, for tests and the CPU training demo.

``fclm-data synthetic --n 2000 --seed 0 --out data/shapesref [--n-val 200] [--image-size 112]``

Each image (default 112×112) shows 0–6 flat shapes on a plain or lightly textured light background:
4 kinds (circle, square, triangle, diamond) × 5 strongly distinct colours (red, green, blue, yellow,
purple) × 2 sizes (small, large). Later shapes may partly hide earlier ones (every shape keeps at
least 60 % of itself visible; shapes of one colour never touch); masks are the *visible* pixels. Everything is a pure function of
``(seed, split, image index)``: the same seed gives the same files, and ``--n`` only adds images.

Files written into ``OUT`` (``SPLIT`` is ``train`` or ``val``; the two splits have separate images):

* ``images/SPLIT-NNNNNN.png``
* ``SPLIT_res.jsonl`` / ``SPLIT_rec.jsonl`` — ``Please segment: the red circle.`` → ``[SEG]``, one
  target with one instance. The expression is the shortest unique one of: colour + shape;
  size + colour + shape; colour + shape + ``on the left|right``; colour + shape + ``at the
  top|bottom`` (thirds of the image, by the visible centroid). An object with no unique
  expression gets no record. ``rec`` records are the same with ``task: rec``. ``meta.difficulty``
  says what tells the target apart: ``colour_only``, ``needs_shape`` or ``needs_size_or_position``.
* ``SPLIT_gres.jsonl`` / ``SPLIT_grec.jsonl`` — ``all circles`` / ``all red shapes`` (every shape or
  colour with ≥ 2 objects), ``all shapes`` (≥ 2 objects) → one ``[SEG]`` whose target holds every
  instance; and per image one expression matching nothing (``the green triangle`` absent, or
  ``all diamonds`` with none) → empty target.
* ``SPLIT_region_caption.jsonl`` — ``Describe <region> in detail.`` → ``A large red circle in the top
  left of the image. It is partly hidden behind a blue square.`` (one per object).
* ``SPLIT_roc.jsonl`` — ``What is the category of <region>? Answer with its name.`` → ``red circle``
  (the name in words, ``meta.category`` = ``red_circle``: Osprey's ROC scoring cleans ``_`` from the
  ground truth but not from predictions, so a model must answer in words).
* ``SPLIT_gcg.jsonl`` — ``The image shows <p>a large red circle</p> [SEG], … and <p>…</p> [SEG] on a
  plain light gray background.`` (objects left to right), ``meta.phrases``.
* ``SPLIT_dlres.jsonl`` — made for real by the ``dam`` and ``dlres`` builders: the captions of the
  objects with a unique (size, colour, shape, position) are written in the Describe Anything layout
  (``dam/SPLIT/shapesref/annotations.json`` + ``images/shard-*.tar`` holding ``{id}.png`` and
  ``{id}.pickle``), read back by ``dam`` into ``dam/SPLIT_region_caption.jsonl`` (images extracted
  to ``dam/SPLIT_images/``) and rewritten by the rule rewriter.
* ``manifest.json`` — parameters, vocabulary, file names, record counts per split and task.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

from data_builders import dam as dam_builder
from data_builders import dlres as dlres_builder
from data_builders.common import BuildResult
from fclm.data.schema import chat, instance, make_record, region_entry, target_entry
from fclm.data.templates import GCG_PROMPT, REGION_CAPTION_PROMPT, ROC_PROMPT, SEG_TOKEN, gcg_phrase, join_names, res_prompt
from fclm.io import ErrorReport, write_json, write_jsonl

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.095), "large": (0.15, 0.19)}
"""Radius range of each size, as a fraction of the image side."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"light gray": (215, 215, 215), "beige": (232, 222, 198), "pale blue": (206, 221, 236)}
OBJECT_COUNT_WEIGHTS = (0.03, 0.17, 0.2, 0.2, 0.17, 0.13, 0.1)
"""Probability of 0, 1, …, 6 objects in an image."""
MIN_VISIBLE = 0.6
"""Smallest visible fraction of a shape once later shapes are drawn over it."""
OCCLUDED_BELOW = 0.97
"""A shape with less of itself visible is described as partly hidden."""
SPLITS = {"train": 0, "val": 1}
TASK_FILES = ("res", "rec", "gres", "grec", "region_caption", "roc", "gcg", "dlres")


@dataclass
class ShapesRefOptions:
    out: Path
    n: int = 1000
    """Training images."""
    n_val: int | None = None
    """Validation images (default ``max(1, n // 10)``)."""
    seed: int = 0
    image_size: int = 112
    max_objects: int = 6
    shard_size: int = 500
    """Images per Describe Anything tar shard (the dlres path)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.n < 0 or (self.n_val is not None and self.n_val < 0):
            raise ValueError("image counts must be >= 0")
        if self.n_val is None:
            self.n_val = max(1, self.n // 10)
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32")
        if not 0 <= self.max_objects <= 6:
            raise ValueError("max_objects must be in [0, 6]")


@dataclass
class Shape:
    colour: str
    shape: str
    size: str
    full: np.ndarray
    visible: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    occluder: int | None = None

    @property
    def category(self) -> str:
        return f"{self.colour}_{self.shape}"

    def name(self, article: str = "a") -> str:
        return f"{article} {self.size} {self.colour} {self.shape}"


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def shape_mask(kind: str, cx: float, cy: float, r: float, s: int) -> np.ndarray:
    """Boolean ``s×s`` mask of a shape centred at ``(cx, cy)`` with radius ``r`` (pixel centres at +0.5)."""
    m = np.zeros((s, s), dtype=bool)
    x0, x1 = max(0, int(cx - 1.3 * r) - 1), min(s, int(cx + 1.3 * r) + 2)
    y0, y1 = max(0, int(cy - 1.3 * r) - 1), min(s, int(cy + 1.3 * r) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        win = dx * dx + dy * dy <= r * r
    elif kind == "square":
        win = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    elif kind == "diamond":
        win = np.abs(dx) + np.abs(dy) <= 1.2 * r
    elif kind == "triangle":  # apex up; inside all three half-planes
        ax, ay, bx, by, qx, qy = cx, cy - 1.1 * r, cx - 1.15 * r, cy + 0.8 * r, cx + 1.15 * r, cy + 0.8 * r

        def side(px: float, py: float, ux: float, uy: float) -> np.ndarray:
            return (ux - px) * (yy - py) - (uy - py) * (xx - px)

        d1, d2, d3 = side(ax, ay, bx, by), side(bx, by, qx, qy), side(qx, qy, ax, ay)
        win = ((d1 >= 0) & (d2 >= 0) & (d3 >= 0)) | ((d1 <= 0) & (d2 <= 0) & (d3 <= 0))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    m[y0:y1, x0:x1] = win
    return m


def render_scene(rng: np.random.Generator, s: int, max_objects: int) -> tuple[np.ndarray, list[Shape], str]:
    """Draw one image: ``(H×W×3 uint8, shapes in drawing order, background description)``."""
    tone = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    textured = bool(rng.random() < 0.5)
    img = np.empty((s, s, 3), dtype=np.int16)
    img[:] = BACKGROUNDS[tone]
    if textured:
        img += rng.integers(-7, 8, size=(s, s, 1), dtype=np.int16)
    weights = np.asarray(OBJECT_COUNT_WEIGHTS[: max_objects + 1])
    n_target = int(rng.choice(len(weights), p=weights / weights.sum()))
    shapes: list[Shape] = []
    for _ in range(n_target):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        kind = SHAPES[rng.integers(len(SHAPES))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        lo, hi = SIZES[size]
        for _attempt in range(30):
            r = float(rng.uniform(lo, hi)) * s
            margin = 1.2 * r + 1
            cx, cy = float(rng.uniform(margin, s - margin)), float(rng.uniform(margin, s - margin))
            full = shape_mask(kind, cx, cy, r, s)
            # keep every earlier shape at least MIN_VISIBLE visible once this one is on top, and never
            # let two shapes of one colour touch (their outlines would merge into one blob)
            grown = binary_dilation(full, iterations=2)
            if all(
                (sh.visible & ~full).sum() >= MIN_VISIBLE * sh.full.sum() and not (sh.colour == colour and (grown & sh.full).any())
                for sh in shapes
            ):
                break
        else:
            continue
        for sh in shapes:
            sh.visible = sh.visible & ~full
        shapes.append(Shape(colour, kind, size, full, full.copy()))
    for i, sh in enumerate(shapes):
        colour = np.asarray(COLOURS[sh.colour], dtype=np.int16) + rng.integers(-10, 11, size=3, dtype=np.int16)
        img[sh.full] = colour
        if sh.visible.sum() < OCCLUDED_BELOW * sh.full.sum():
            overlaps = [(int((sh.full & shapes[j].full).sum()), j) for j in range(i + 1, len(shapes))]
            sh.occluder = max(overlaps)[1]
    if textured:
        img += rng.integers(-4, 5, size=(s, s, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8), shapes, f"{'textured' if textured else 'plain'} {tone}"


# --------------------------------------------------------------------------------------------------
# Language
# --------------------------------------------------------------------------------------------------


def zones(mask: np.ndarray) -> tuple[str, str]:
    """``(horizontal, vertical)`` third of the image holding the mask's centroid."""
    s_y, s_x = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / s_x, (ys.mean() + 0.5) / s_y
    h = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "center")
    v = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "middle")
    return h, v


def position_phrase(h: str, v: str) -> str:
    """``in the top left`` / ``at the top`` / ``on the left`` / ``in the center`` …"""
    if v == "middle":
        return "in the center" if h == "center" else f"on the {h}"
    if h == "center":
        return f"at the {v}"
    return f"in the {v} {h}"


def caption_of(shapes: list[Shape], i: int) -> str:
    sh = shapes[i]
    h, v = zones(sh.visible)
    text = f"A {sh.size} {sh.colour} {sh.shape} {position_phrase(h, v)} of the image."
    if sh.occluder is not None:
        occ = shapes[sh.occluder]
        text += f" It is partly hidden behind a {occ.colour} {occ.shape}."
    return text


DIFFICULTIES: tuple[str, ...] = ("colour_only", "needs_shape", "needs_size_or_position")
"""What a RES/REC target needs to be told apart from the other shapes of its image (``meta.difficulty``):
its colour alone; its colour and shape; or also its size or position."""


def difficulty(shapes: list[Shape], i: int) -> str:
    """``colour_only`` when no other shape has shape ``i``'s colour, ``needs_shape`` when no other has its
    colour and shape, else ``needs_size_or_position`` (:data:`DIFFICULTIES`)."""
    sh = shapes[i]
    if sum(o.colour == sh.colour for o in shapes) == 1:
        return "colour_only"
    if sum(o.colour == sh.colour and o.shape == sh.shape for o in shapes) == 1:
        return "needs_shape"
    return "needs_size_or_position"


def unique_expression(shapes: list[Shape], i: int) -> str | None:
    """The shortest expression that names shape ``i`` and no other one, or None (see the module docstring)."""
    sh = shapes[i]
    same = [o for o in shapes if o.colour == sh.colour and o.shape == sh.shape]
    base = f"{sh.colour} {sh.shape}"
    if len(same) == 1:
        return f"the {base}"
    if sum(o.size == sh.size for o in same) == 1:
        return f"the {sh.size} {base}"
    h, v = zones(sh.visible)
    same_zones = [zones(o.visible) for o in same]
    if h != "center" and sum(z[0] == h for z in same_zones) == 1:
        return f"the {base} on the {h}"
    if v != "middle" and sum(z[1] == v for z in same_zones) == 1:
        return f"the {base} at the {v}"
    return None


def group_expressions(shapes: list[Shape], rng: np.random.Generator) -> list[tuple[str, list[int], str]]:
    """``(expression, indices of the shapes it names, kind)``: groups of ≥ 2, then one naming nothing."""
    out: list[tuple[str, list[int], str]] = []
    for kind in SHAPES:
        idx = [i for i, s in enumerate(shapes) if s.shape == kind]
        if len(idx) >= 2:
            out.append((f"all {kind}s", idx, "multi"))
    for colour in COLOURS:
        idx = [i for i, s in enumerate(shapes) if s.colour == colour]
        if len(idx) >= 2:
            out.append((f"all {colour} shapes", idx, "multi"))
    if len(shapes) >= 2:
        out.append(("all shapes", list(range(len(shapes))), "multi"))
    present = {(s.colour, s.shape) for s in shapes}
    absent_kinds = [k for k in SHAPES if all(s.shape != k for s in shapes)]
    if absent_kinds and rng.random() < 0.2:
        out.append((f"all {absent_kinds[rng.integers(len(absent_kinds))]}s", [], "none"))
    else:
        combos = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
        c, k = combos[rng.integers(len(combos))]
        out.append((f"the {c} {k}", [], "none"))
    return out


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def image_records(split: str, idx: int, image: str, shapes: list[Shape], background: str, rng: np.random.Generator) -> dict[str, list[dict]]:
    """All records of one image, by task (dlres excluded: it comes from the DAM path)."""
    key = f"{split}-{idx:06d}"
    inst = [instance(sh.visible) for sh in shapes]
    base_meta = {"source": "shapesref", "split": split, "image_index": idx}
    out: dict[str, list[dict]] = {t: [] for t in TASK_FILES if t != "dlres"}
    for i, sh in enumerate(shapes):
        rle, box = inst[i]
        caption = caption_of(shapes, i)
        obj_meta = {**base_meta, "object": i, "category": sh.category, "size": sh.size, "occluded": sh.occluder is not None}
        out["region_caption"].append(
            make_record(id=f"shapesref-{key}-cap-{i}", image=image, task="region_caption",
                        messages=chat(REGION_CAPTION_PROMPT, caption), regions=[region_entry(rle, box)], meta=obj_meta)
        )
        out["roc"].append(
            make_record(id=f"shapesref-{key}-roc-{i}", image=image, task="roc",
                        messages=chat(ROC_PROMPT, sh.category.replace("_", " ")), regions=[region_entry(rle, box)], meta=obj_meta)
        )
        expr = unique_expression(shapes, i)
        if expr is not None:
            for task in ("res", "rec"):
                out[task].append(
                    make_record(id=f"shapesref-{key}-{task}-{i}", image=image, task=task,
                                messages=chat(res_prompt(expr), SEG_TOKEN), targets=[target_entry([rle], [box])],
                                meta={**obj_meta, "expression": expr, "difficulty": difficulty(shapes, i)})
                )
    for k, (expr, idx_list, kind) in enumerate(group_expressions(shapes, rng)):
        target = target_entry([inst[i][0] for i in idx_list], [inst[i][1] for i in idx_list])
        for task in ("gres", "grec"):
            out[task].append(
                make_record(id=f"shapesref-{key}-{task}-{k}", image=image, task=task,
                            messages=chat(res_prompt(expr), SEG_TOKEN), targets=[target],
                            meta={**base_meta, "expression": expr, "kind": kind, "objects": idx_list})
            )
    order = sorted(range(len(shapes)), key=lambda i: (np.nonzero(shapes[i].visible)[1].mean(), i))
    phrases = [shapes[i].name("a") for i in order]
    if shapes:
        text = f"The image shows {join_names([gcg_phrase(p) for p in phrases])} on a {background} background."
    else:
        text = f"The image shows an empty {background} background."
    out["gcg"].append(
        make_record(id=f"shapesref-{key}-gcg", image=image, task="gcg", messages=chat(GCG_PROMPT, text),
                    targets=[target_entry([inst[i][0]], [inst[i][1]]) for i in order],
                    meta={**base_meta, "phrases": phrases, "objects": order})
    )
    return out


def dam_regions(shapes: list[Shape]) -> list[dict]:
    """Describe Anything region dicts for the shapes whose (size, colour, shape, position) is unique."""
    keys = [(s.size, s.colour, s.shape, zones(s.visible)) for s in shapes]
    counts = Counter(keys)
    regions = []
    for i, sh in enumerate(shapes):
        if counts[keys[i]] == 1:
            rle, _ = instance(sh.visible)
            regions.append({"caption": caption_of(shapes, i), "mask_rle": rle, "category": sh.category, "object": i})
    return regions


class _ShardWriter:
    """Writes ``{key}.png`` + ``{key}.pickle`` pairs into numbered webdataset tar shards."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, max(1, shard_size)
        self.count, self.tar = 0, None
        folder.mkdir(parents=True, exist_ok=True)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, png: bytes, regions: list[dict]) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            self.tar = tarfile.open(self.folder / f"shard-{self.count // self.shard_size:06d}.tar", "w")
        self._add(f"{key}.png", png)
        self._add(f"{key}.pickle", pickle.dumps(regions, protocol=4))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def build_split(opts: ShapesRefOptions, split: str, n: int) -> dict[str, Any]:
    """Images, task files and the DAM → dlres path of one split; returns its record counts."""
    out = opts.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    dam_root = out / "dam" / split
    stale = [dam_root, out / "dam" / f"{split}_images", out / "dam" / f"{split}_region_caption.jsonl.parts"]
    if any(p.exists() for p in stale):
        # an earlier ShapesRef run (the dam builder would resume from its parts): remove it, but
        # never a folder that ShapesRef did not write
        if not (out / "manifest.json").is_file() or json.loads((out / "manifest.json").read_text()).get("name") != "ShapesRef":
            raise ValueError(f"{out / 'dam'} exists but {out} holds no ShapesRef manifest.json; choose another --out")
        for p in stale:
            if p.exists():
                shutil.rmtree(p)
    shards = _ShardWriter(dam_root / "shapesref" / "images", opts.shard_size)
    annotations: dict[str, list[dict]] = {}
    records: dict[str, list[dict]] = {t: [] for t in TASK_FILES if t != "dlres"}
    n_objects = Counter()
    for idx in range(n):
        rng = np.random.default_rng([opts.seed, SPLITS[split], idx])
        pixels, shapes, background = render_scene(rng, opts.image_size, opts.max_objects)
        key = f"{split}-{idx:06d}"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        png = buf.getvalue()
        (out / "images" / f"{key}.png").write_bytes(png)
        for task, recs in image_records(split, idx, f"images/{key}.png", shapes, background, rng).items():
            records[task] += recs
        regions = dam_regions(shapes)
        if regions:
            shards.add(key, png, regions)
            annotations[key] = regions
        n_objects[len(shapes)] += 1
    shards.close()
    write_json(dam_root / "shapesref" / "annotations.json", annotations, indent=None)
    counts: dict[str, int] = {}
    for task, recs in records.items():
        counts[task] = write_jsonl(out / f"{split}_{task}.jsonl", recs)
    dam_out = out / "dam" / f"{split}_region_caption.jsonl"
    dam_result = dam_builder.build(dam_builder.DamOptions(root=dam_root, out=dam_out, image_dir=out / "dam" / f"{split}_images", strict=True))
    dl = dlres_builder.build(dlres_builder.DlresOptions(src=dam_out, out=out / f"{split}_dlres.jsonl", rewriter="rule", strict=True))
    counts["dlres"] = dl.records
    return {"images": n, "records": counts, "dam_region_captions": dam_result.records, "objects_per_image": dict(sorted(n_objects.items()))}


def build(opts: ShapesRefOptions) -> BuildResult:
    """Generate both splits and ``manifest.json``."""
    t0 = time.time()
    opts.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": build_split(opts, "train", opts.n), "val": build_split(opts, "val", opts.n_val)}
    manifest = {
        "name": "ShapesRef",
        "description": (
            "Generated shapes with referring, grouping, captioning, classification, grounded-captioning "
            "and DL-RES records. Masks are the visible pixels; record layouts are in data_builders/synthetic.py."
        ),
        "seed": opts.seed,
        "image_size": opts.image_size,
        "max_objects": opts.max_objects,
        "vocabulary": {
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "shapes": list(SHAPES),
            "sizes": {k: list(v) for k, v in SIZES.items()},
            "backgrounds": list(BACKGROUNDS),
            "categories": [f"{c}_{s}" for c in COLOURS for s in SHAPES],
        },
        "files": {split: {task: f"{split}_{task}.jsonl" for task in TASK_FILES} for split in splits},
        "images": "images/{split}-{index:06d}.png",
        "splits": splits,
    }
    write_json(opts.out / "manifest.json", manifest)
    total = sum(sum(s["records"].values()) for s in splits.values())
    counts = {split: f"{s['images']} images" for split, s in splits.items()}
    counts["seconds"] = round(time.time() - t0, 1)
    return BuildResult(opts.out, total, ErrorReport(), counts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1000, help="training images")
    p.add_argument("--n-val", type=int, default=None, help="validation images (default max(1, n // 10))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--shard-size", type=int, default=500, help="images per Describe Anything tar shard")
    p.add_argument("--out", required=True, type=Path, help="output folder")


def run(args: argparse.Namespace) -> BuildResult:
    return build(
        ShapesRefOptions(out=args.out, n=args.n, n_val=args.n_val, seed=args.seed, image_size=args.image_size,
                         max_objects=args.max_objects, shard_size=args.shard_size)
    )
