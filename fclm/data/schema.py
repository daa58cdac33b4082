"""The one FCLM data record (JSON Lines), as code: constructors, conventions and :func:`validate_record`.

A record (one line of a JSONL file)::

    {"id": "refcoco-unc-val-123",
     "image": "images/COCO_train2014_000000000123.jpg",   # relative to the JSONL file's folder, or absolute
     "task": "res",                                        # one of TASKS
     "head": "sam",                                        # optional: grounding head for this sample
     "messages": [{"role": "user", "content": "Please segment: the man on the left."},
                  {"role": "assistant", "content": "[SEG]"}],
     "regions": [],                                        # masks shown to the model
     "targets": [{"masks": [RLE, ...], "boxes": [[x1, y1, x2, y2], ...]}],   # one per [SEG]
     "meta": {"source": "refcoco", "split": "val", "ref_id": 123}}

Conventions (the processor and the evaluator rely on them):

* ``regions``: ``{"mask": RLE | polygons, "box": [x1, y1, x2, y2]}`` plus optional
  ``"target_index": k`` (this region is the same object as the k-th ``[SEG]`` target: a pair for the
  latent loss) and optional ``"in_prompt": false`` (the region is in no placeholder; it is carried
  only as a latent-loss pair, as in ``dlres`` records).
* Placeholders in user turns index the *prompt regions* (those without ``"in_prompt": false``, in
  list order): each bare ``<region>`` takes the next one; ``<regionN>`` names the N-th (1-based).
  A record uses one style or the other, and every prompt region is named. See
  :func:`placeholder_region_indices`.
* ``targets``: one per ``[SEG]`` in the assistant turns, in order; each holds zero (no target), one
  or several instances; ``masks`` and ``boxes`` have the same length.
* Masks written by builders are compressed COCO RLE (:func:`fclm.masks.encode_mask`); polygons are
  accepted on input. Boxes are absolute pixels of the original image, ``x2 = x + w``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fclm.data.templates import SEG_TOKEN
from fclm.masks import decode_mask, encode_mask, mask_to_box

TASKS: tuple[str, ...] = (
    "res",
    "rec",
    "gres",
    "grec",
    "dlres",
    "region_caption",
    "roc",
    "gcg",
    "reason_seg",
    "conversation",
)
ROLES: tuple[str, ...] = ("system", "user", "assistant")
REQUIRED_KEYS: tuple[str, ...] = ("id", "image", "task", "messages", "regions", "targets")
BOX_TOLERANCE = 1.0
"""Pixels a box may reach past the image border (COCO boxes of polygons touch ``W`` and ``H``)."""

REGION_PLACEHOLDER = re.compile(r"<region([0-9]*)>")
"""``<region>`` (next prompt region) or ``<regionN>`` (the N-th prompt region, 1-based; ASCII digits only)."""


# --------------------------------------------------------------------------------------------------
# Constructors used by builders
# --------------------------------------------------------------------------------------------------


def make_record(
    *,
    id: str,
    image: str,
    task: str,
    messages: list[dict],
    regions: list[dict] | None = None,
    targets: list[dict] | None = None,
    meta: dict | None = None,
    head: str | None = None,
) -> dict:
    """Assemble a record with keys in the canonical order (``head`` only when given)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    rec: dict[str, Any] = {"id": id, "image": image, "task": task}
    if head is not None:
        rec["head"] = head
    rec["messages"] = messages
    rec["regions"] = regions if regions is not None else []
    rec["targets"] = targets if targets is not None else []
    rec["meta"] = meta if meta is not None else {}
    return rec


def chat(user: str, assistant: str) -> list[dict]:
    """A one-turn conversation."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def instance(mask: np.ndarray) -> tuple[dict, list[float]]:
    """``(RLE, box)`` of a boolean ``H×W`` mask."""
    return encode_mask(mask), mask_to_box(mask)


def region_entry(
    mask_rle: dict, box: Sequence[float], *, target_index: int | None = None, in_prompt: bool = True
) -> dict:
    """One ``regions`` entry (see the module docstring for ``target_index`` and ``in_prompt``)."""
    entry: dict[str, Any] = {"mask": mask_rle, "box": [float(v) for v in box]}
    if target_index is not None:
        entry["target_index"] = int(target_index)
    if not in_prompt:
        entry["in_prompt"] = False
    return entry


def target_entry(masks: Iterable[dict] = (), boxes: Iterable[Sequence[float]] = ()) -> dict:
    """One ``targets`` entry; empty lists mean "no target"."""
    masks, boxes = list(masks), [[float(v) for v in b] for b in boxes]
    if len(masks) != len(boxes):
        raise ValueError(f"a target needs one box per mask, got {len(masks)} masks and {len(boxes)} boxes")
    return {"masks": masks, "boxes": boxes}


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO ``[x, y, w, h]`` → ``[x1, y1, x2, y2]`` with ``x2 = x + w``; ``ValueError`` unless 4 finite numbers."""
    try:
        x, y, w, h = (float(v) for v in box)
    except OverflowError:
        raise ValueError(f"box {box!r} is not finite") from None
    out = [x, y, x + w, y + h]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"box {[x, y, w, h]} is not finite")
    return out


# --------------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------------


def count_seg_tokens(messages: Sequence[dict]) -> int:
    """Number of ``[SEG]`` in the assistant turns (= the number of targets a record must have)."""
    return sum(
        str(m.get("content", "")).count(SEG_TOKEN)
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant"
    )


def prompt_region_indices(record: dict) -> list[int]:
    """Indices into ``record["regions"]`` of the prompt regions (those without ``"in_prompt": false``)."""
    return [i for i, r in enumerate(record.get("regions", [])) if not (isinstance(r, dict) and r.get("in_prompt") is False)]


def placeholder_region_indices(record: dict) -> list[int]:
    """For each placeholder in the user turns, in reading order, the index into ``record["regions"]``.

    A bare ``<region>`` takes the next prompt region; ``<regionN>`` takes the N-th prompt region
    (1-based). Raises ``ValueError`` when the placeholders do not name the prompt regions exactly
    (mixed styles, a number out of range, a prompt region never named, or too few/many ``<region>``).
    """
    prompt = prompt_region_indices(record)
    found: list[str] = []
    for m in record.get("messages", []):
        if isinstance(m, dict) and m.get("role") == "user":
            found += REGION_PLACEHOLDER.findall(str(m.get("content", "")))
    if not found:
        if prompt:
            raise ValueError(f"{len(prompt)} prompt region(s) but no <region> placeholder in the user turns")
        return []
    numbered = [f for f in found if f]
    if numbered and len(numbered) != len(found):
        raise ValueError("user turns mix <region> and <regionN> placeholders")
    if not numbered:
        if len(found) != len(prompt):
            raise ValueError(f"{len(found)} <region> placeholder(s) but {len(prompt)} prompt region(s)")
        return list(prompt)
    nums = [int(f) for f in numbered]
    bad = sorted({n for n in nums if not 1 <= n <= len(prompt)})
    if bad:
        raise ValueError(f"placeholder(s) {', '.join(f'<region{n}>' for n in bad)} but {len(prompt)} prompt region(s)")
    missing = sorted(set(range(1, len(prompt) + 1)) - set(nums))
    if missing:
        raise ValueError(f"prompt region(s) {missing} named by no <regionN> placeholder")
    return [prompt[n - 1] for n in nums]


def resolve_image_path(image: str, base_dir: str | os.PathLike | None) -> Path:
    """Absolute path of a record's ``image``: absolute paths stay, relative ones join ``base_dir``."""
    p = Path(image)
    if p.is_absolute() or base_dir is None:
        return p
    return Path(base_dir) / p


def relative_image_path(image_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The ``image`` field for a file written into ``out_dir``: the path relative to it (POSIX separators)."""
    return Path(os.path.relpath(os.path.abspath(image_path), os.path.abspath(out_dir))).as_posix()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file; reads only its header. Raises ``OSError`` if it does not open."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validate_record(
    record: Any,
    where: str,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
    decode_masks: bool = True,
) -> list[str]:
    """Check one record against the schema; return the problems found (``"where: problem"``), none if valid.

    Checks: required keys and types; ``task`` in :data:`TASKS`; roles; the number of ``[SEG]`` in
    the assistant turns equals ``len(targets)``; placeholders name the prompt regions exactly
    (:func:`placeholder_region_indices`); ``target_index`` in range; regions with
    ``"in_prompt": false`` carry a ``target_index``; every mask decodes (RLE or polygons of ≥ 3
    points) and is non-empty; all mask sizes agree; boxes are ``[x1, y1, x2, y2]`` with
    ``x1 ≤ x2``, ``y1 ≤ y2`` inside the image (``BOX_TOLERANCE``). With ``check_images`` the image
    (resolved against ``image_root``) must exist and open, and its size must match the masks.
    ``decode_masks=False`` checks RLE structure and sizes without decoding (fast, for large loads).
    """
    return [f"{where}: {p}" for p in check_record(record, image_root=image_root, check_images=check_images, decode_masks=decode_masks)]


def check_record(
    record: Any,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
    decode_masks: bool = True,
) -> list[str]:
    """:func:`validate_record` without the location prefix."""
    if not isinstance(record, dict):
        return [f"a record must be a JSON object, got {type(record).__name__}"]
    problems: list[str] = []
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return [f"missing key(s): {', '.join(missing)}"]
    if not isinstance(record["id"], str) or not record["id"]:
        problems.append("'id' must be a non-empty string")
    if not isinstance(record["image"], str) or not record["image"]:
        problems.append("'image' must be a non-empty string (a path)")
    task = record["task"]
    if task not in TASKS:
        problems.append(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if "head" in record and record["head"] is not None and (not isinstance(record["head"], str) or not record["head"]):
        problems.append("'head' must be a non-empty string when given")
    if "meta" in record and not isinstance(record["meta"], dict):
        problems.append("'meta' must be an object")

    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        problems.append("'messages' must be a non-empty list")
        messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}")
    if messages and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("no assistant turn")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and REGION_PLACEHOLDER.search(str(m.get("content", ""))):
            problems.append(f"messages[{i}] (assistant) contains a <region> placeholder")

    regions, targets = record["regions"], record["targets"]
    if not isinstance(regions, list):
        problems.append("'regions' must be a list")
        regions = []
    if not isinstance(targets, list):
        problems.append("'targets' must be a list")
        targets = []
    n_seg = count_seg_tokens(messages)
    if n_seg != len(targets):
        problems.append(f"{n_seg} {SEG_TOKEN} in the assistant turns but {len(targets)} target(s)")

    # Collect masks and boxes with their names; check structure.
    masks: list[tuple[str, Any]] = []
    boxes: list[tuple[str, Any]] = []
    for i, r in enumerate(regions):
        name = f"regions[{i}]"
        if not isinstance(r, dict) or "mask" not in r or "box" not in r:
            problems.append(f"{name} must be {{'mask': ..., 'box': [x1, y1, x2, y2]}}")
            continue
        masks.append((f"{name}.mask", r["mask"]))
        boxes.append((f"{name}.box", r["box"]))
        ti = r.get("target_index")
        if ti is not None and (not isinstance(ti, int) or isinstance(ti, bool) or not 0 <= ti < len(targets)):
            problems.append(f"{name}.target_index {ti!r} is not the index of one of the {len(targets)} target(s)")
        ip = r.get("in_prompt", True)
        if not isinstance(ip, bool):
            problems.append(f"{name}.in_prompt must be true or false")
        elif not ip and ti is None:
            problems.append(f"{name} has in_prompt false but no target_index (it would serve no purpose)")
    for j, t in enumerate(targets):
        name = f"targets[{j}]"
        if not isinstance(t, dict) or not isinstance(t.get("masks"), list) or not isinstance(t.get("boxes"), list):
            problems.append(f"{name} must be {{'masks': [...], 'boxes': [...]}}")
            continue
        if len(t["masks"]) != len(t["boxes"]):
            problems.append(f"{name} has {len(t['masks'])} mask(s) but {len(t['boxes'])} box(es)")
        masks += [(f"{name}.masks[{k}]", m) for k, m in enumerate(t["masks"])]
        boxes += [(f"{name}.boxes[{k}]", b) for k, b in enumerate(t["boxes"])]

    if isinstance(regions, list) and all(isinstance(r, dict) for r in regions):
        try:
            placeholder_region_indices({"messages": messages, "regions": regions})
        except ValueError as e:
            problems.append(str(e))

    # Sizes: the image's (when checked) is the reference, else the first RLE's.
    size: tuple[int, int] | None = None
    if check_images and isinstance(record["image"], str) and record["image"]:
        path = resolve_image_path(record["image"], image_root)
        if not path.is_file():
            problems.append(f"image not found: {path}")
        else:
            try:
                size = image_size(path)
            except Exception as e:  # PIL raises several types for unreadable files
                problems.append(f"image does not open: {path} ({type(e).__name__}: {e})")
    size_from = "the image"
    for name, m in masks:
        if isinstance(m, dict):
            s = m.get("size")
            if isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) for v in s):
                if size is None:
                    size, size_from = (int(s[0]), int(s[1])), name
                elif (int(s[0]), int(s[1])) != size:
                    problems.append(f"{name} has size {list(s)} but {size_from} is {list(size)}")
    for name, m in masks:
        problems += _check_mask(name, m, size, decode_masks)
    for name, b in boxes:
        problems += _check_box(name, b, size)
    return problems


def _check_mask(name: str, m: Any, size: tuple[int, int] | None, decode: bool) -> list[str]:
    if isinstance(m, dict):
        if decode:
            try:
                arr = decode_mask(m)
            except ValueError as e:
                return [f"{name}: bad RLE ({e})"]
            return [] if arr.any() else [f"{name} is empty"]
        s, c = m.get("size"), m.get("counts")
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
            return [f"{name}: bad RLE (size must be [H, W] with positive ints)"]
        if not isinstance(c, (str, list)):
            return [f"{name}: bad RLE (counts must be a string or a list)"]
        return []
    if isinstance(m, list):
        if not m:
            return [f"{name}: empty polygon list"]
        for k, poly in enumerate(m):
            if not isinstance(poly, list) or not all(_finite_number(v) for v in poly):
                return [f"{name}: polygon {k} must be a flat list of numbers"]
            if len(poly) < 6 or len(poly) % 2:
                return [f"{name}: polygon {k} has {len(poly) / 2:g} points; at least 3 (x, y) pairs are needed"]
        if decode and size is not None:
            try:
                arr = decode_mask(m, *size)
            except ValueError as e:
                return [f"{name}: bad polygon ({e})"]
            if not arr.any():
                return [f"{name} is empty"]
        return []
    return [f"{name}: a mask must be an RLE object or a polygon list, got {type(m).__name__}"]


def _finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (a 400-digit int is not: it overflows)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _check_box(name: str, b: Any, size: tuple[int, int] | None) -> list[str]:
    if not (
        isinstance(b, (list, tuple))
        and len(b) == 4
        and all(_finite_number(v) for v in b)
    ):
        return [f"{name} must be 4 finite numbers [x1, y1, x2, y2]"]
    x1, y1, x2, y2 = (float(v) for v in b)
    if x2 < x1 or y2 < y1:
        return [f"{name} {list(b)} has x2 < x1 or y2 < y1 (boxes are [x1, y1, x2, y2])"]
    if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE:
        return [f"{name} {list(b)} starts outside the image"]
    if size is not None and (x2 > size[1] + BOX_TOLERANCE or y2 > size[0] + BOX_TOLERANCE):
        return [f"{name} {list(b)} ends outside the {size[1]}x{size[0]} (WxH) image"]
    return []
