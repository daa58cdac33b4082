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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

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


@dataclass(frozen=True)
class Placeholder:
    """A placeholder in a message: ``<region>`` / ``<regionN>`` in a user turn, ``[SEG]`` in an assistant turn."""

    kind: str
    """``"region"`` or ``"seg"``."""
    digits: str = ""
    """The N of ``<regionN>`` as written (ASCII digits, 1-based); empty for a bare ``<region>`` and for ``[SEG]``."""


def split_placeholders(role: str, content: str) -> list[str | Placeholder]:
    """``content`` of a ``role`` message cut into text and :class:`Placeholder` pieces, in order.

    The one reader of placeholders: user turns hold ``<region>`` / ``<regionN>``, assistant turns
    ``[SEG]``; anything else (a system turn, ``[SEG]`` typed by a user, ``<region>`` written by the
    assistant) is text. Text pieces may be empty.
    """
    pieces: list[str | Placeholder] = []
    if role == "user":
        pos = 0
        for match in REGION_PLACEHOLDER.finditer(content):
            pieces += [content[pos : match.start()], Placeholder("region", match.group(1))]
            pos = match.end()
        pieces.append(content[pos:])
    elif role == "assistant":
        for k, text in enumerate(content.split(SEG_TOKEN)):
            pieces += [Placeholder("seg"), text] if k else [text]
    else:
        pieces.append(content)
    return pieces


def _placeholders(messages: Sequence[Any], kind: str) -> list[Placeholder]:
    """The placeholders of ``kind`` in ``messages`` (malformed messages are skipped, contents read as text)."""
    return [
        p
        for m in messages
        if isinstance(m, dict)
        for p in split_placeholders(str(m.get("role")), str(m.get("content", "")))
        if isinstance(p, Placeholder) and p.kind == kind
    ]


def count_seg_tokens(messages: Sequence[dict]) -> int:
    """Number of ``[SEG]`` in the assistant turns (= the number of targets a record must have)."""
    return len(_placeholders(messages, "seg"))


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
    found = _placeholders(record.get("messages", []), "region")
    if not found:
        if prompt:
            raise ValueError(f"{len(prompt)} prompt region(s) but no <region> placeholder in the user turns")
        return []
    numbered = [p.digits for p in found if p.digits]
    if numbered and len(numbered) != len(found):
        raise ValueError("user turns mix <region> and <regionN> placeholders")
    if not numbered:
        if len(found) != len(prompt):
            raise ValueError(f"{len(found)} <region> placeholder(s) but {len(prompt)} prompt region(s)")
        return list(prompt)
    nums = [int(d) for d in numbered]
    bad = sorted({n for n in nums if not 1 <= n <= len(prompt)})
    if bad:
        raise ValueError(f"placeholder(s) {', '.join(f'<region{n}>' for n in bad)} but {len(prompt)} prompt region(s)")
    missing = sorted(set(range(1, len(prompt) + 1)) - set(nums))
    if missing:
        raise ValueError(f"prompt region(s) {missing} named by no <regionN> placeholder")
    return [prompt[n - 1] for n in nums]


class Turn(NamedTuple):
    """A non-system message of a :class:`ParsedRecord`: its role and :func:`split_placeholders` pieces."""

    role: str
    pieces: tuple[str | Placeholder, ...]


@dataclass(frozen=True)
class ParsedRecord:
    """What the processor encodes of a record (:func:`parse_record`), its structure checked."""

    system: str | None
    """Content of a leading system message, ``None`` when there is none."""
    turns: tuple[Turn, ...]
    """The other messages; the first is a user turn (it carries the image)."""
    regions: list
    """``record["regions"]``: objects with a ``mask``."""
    region_rows: tuple[int, ...]
    """Index into :attr:`regions` of each region row: one per placeholder in reading order
    (:func:`placeholder_region_indices`), then the ``"in_prompt": false`` regions in list order."""
    n_prompt_rows: int
    """How many of :attr:`region_rows` come from placeholders."""
    targets: list
    """``record["targets"]`` (one per ``[SEG]``); for a generation prompt, an empty target per ``[SEG]``."""
    n_seg: int
    """``[SEG]`` placeholders in the assistant turns."""


def parse_record(record: dict, *, add_generation_prompt: bool = False) -> ParsedRecord:
    """Parse a record's conversation for encoding; ``ValueError`` (the problem) when it cannot be encoded.

    The rules an encodable record follows, a subset of :func:`check_record`'s (an inference prompt needs
    no ``id``, ``image``, ``task``, boxes or assistant turn): :func:`message_problems`; ``regions`` a list
    of objects with a ``mask`` (:func:`region_entry_problem`) named exactly by the placeholders
    (:func:`placeholder_region_indices`); ``targets`` a list with one entry per ``[SEG]``
    (:func:`seg_count_problem`). With ``add_generation_prompt`` the conversation must end with a user turn
    and ``targets`` is not read. Masks, boxes and ``target_index`` are checked where they are decoded
    (:func:`decode_record_mask`, :func:`box_problem`, :func:`target_index_problem`).
    """
    messages = record.get("messages")
    problems = message_problems(messages)
    if problems:
        raise ValueError(problems[0])
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ValueError("add_generation_prompt needs a conversation that ends with a user turn")
    regions = record.get("regions") or []
    if not isinstance(regions, list):
        raise ValueError("'regions' must be a list")
    for i, r in enumerate(regions):
        problem = region_entry_problem(i, r, box_required=False)
        if problem:
            raise ValueError(problem)
    order = placeholder_region_indices({"messages": turns, "regions": regions})
    rows = order + [i for i, r in enumerate(regions) if r.get("in_prompt") is False]
    parsed_turns = tuple(Turn(m["role"], tuple(split_placeholders(m["role"], m["content"]))) for m in turns)
    n_seg = sum(isinstance(p, Placeholder) and p.kind == "seg" for t in parsed_turns for p in t.pieces)
    if add_generation_prompt:
        targets: list = [{"masks": [], "boxes": []}] * n_seg
    else:
        targets = record.get("targets") or []
        if not isinstance(targets, list):
            raise ValueError("'targets' must be a list")
        problem = seg_count_problem(n_seg, len(targets))
        if problem:
            raise ValueError(problem)
    return ParsedRecord(system, parsed_turns, regions, tuple(rows), len(order), targets, n_seg)


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
#
# Each rule is one function below, used by both levels of checking:
# * a *stored* record (a JSONL line; :func:`check_record`, run by the datasets, ``fclm-data validate``
#   and the builders) must follow all of them;
# * an *encodable* record (what :class:`fclm.processor.FCLMProcessor` takes, e.g. an inference prompt;
#   :func:`parse_record` plus the mask and box rules where the processor decodes them) may omit
#   ``id``/``image``/``task``, boxes and the assistant turn.
# Problems are strings naming the field (``regions[2].box …``); the callers add the record's location.
# --------------------------------------------------------------------------------------------------

BOX_MASK_TOLERANCE = 2.0
"""A region box within this many pixels of its mask's box always agrees with it (tiny objects)."""


def message_problems(messages: Any) -> list[str]:
    """``messages`` is a non-empty list of ``{role, content: str}``; a system message comes only first,
    and the first other message is a user turn (it carries the image)."""
    if not isinstance(messages, list) or not messages:
        return ["'messages' must be a non-empty list"]
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            problems.append(f"messages[{i}] must be {{'role': {'|'.join(ROLES)}, 'content': str}}")
        elif not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}].content must be a string")
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    if "system" in turns:
        problems.append("a system message may only come first")
    if not turns or turns[0] != "user":
        problems.append("the first non-system message must be a user turn (it carries the image)")
    return problems


def seg_count_problem(n_seg: int, n_targets: int) -> str | None:
    """One target per ``[SEG]`` of the assistant turns."""
    if n_seg != n_targets:
        return f"{n_seg} {SEG_TOKEN} token(s) in the assistant turns but {n_targets} target(s)"
    return None


def region_entry_problem(i: int, region: Any, *, box_required: bool = True) -> str | None:
    """``regions[i]`` is an object with a ``mask`` (and a ``box``, unless ``box_required`` is false)."""
    if box_required:
        if not isinstance(region, dict) or "mask" not in region or "box" not in region:
            return f"regions[{i}] must be {{'mask': ..., 'box': [x1, y1, x2, y2]}}"
    elif not isinstance(region, dict) or "mask" not in region:
        return f"regions[{i}] must be an object with a 'mask'"
    return None


def target_index_problem(i: int, ti: Any, n_targets: int) -> str | None:
    """``regions[i].target_index`` (when given) is the index of a target."""
    if ti is None or (isinstance(ti, int) and not isinstance(ti, bool) and 0 <= ti < n_targets):
        return None
    valid = f"0..{n_targets - 1}" if n_targets else "the record has no targets"
    return f"regions[{i}].target_index {ti!r} is not a target index ({valid})"


def target_entry_problem(j: int, target: Any, *, boxes_required: bool = True) -> str | None:
    """``targets[j]`` is ``{"masks": [...], "boxes": [...]}`` with one box per mask; unless
    ``boxes_required``, ``boxes`` (then taken from the masks) and ``masks`` (no target) may be missing."""
    name = f"targets[{j}]"
    if not isinstance(target, dict):
        return f"{name} must be an object with 'masks' and 'boxes'"
    masks, boxes = target.get("masks"), target.get("boxes")
    if not boxes_required:
        masks, boxes = masks or [], boxes or []
    if not isinstance(masks, list) or not isinstance(boxes, list):
        return f"{name}.masks and .boxes must be lists"
    if boxes and not masks:
        return f"{name} has {len(boxes)} box(es) but no masks; every instance needs a mask"
    if len(masks) != len(boxes) and (boxes or boxes_required):
        return f"{name} has {len(masks)} mask(s) but {len(boxes)} box(es)"
    return None


def _declared_size(m: Any) -> tuple[int, int] | None:
    """``(H, W)`` an RLE mask declares, if it declares two ints."""
    s = m.get("size") if isinstance(m, dict) else None
    if isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) for v in s):
        return int(s[0]), int(s[1])
    return None


def mask_size_problem(name: str, mask: Any, size: tuple[int, int], size_from: str = "the image") -> str | None:
    """An RLE mask's declared ``(H, W)`` equals ``size``, the image's (or ``size_from``'s, another mask)."""
    declared = _declared_size(mask)
    if declared is not None and declared != tuple(size):
        return f"{name} has size {list(mask['size'])} but {size_from} is {list(size)} (sizes are [H, W])"
    return None


def decode_record_mask(
    name: str, mask: Any, size: tuple[int, int] | None = None, *, nonempty: bool = False
) -> np.ndarray:
    """Decode a record's mask (RLE or polygons); ``ValueError`` naming ``name`` and the problem.

    With ``size`` (the image's ``(H, W)``) the mask must have that size (:func:`mask_size_problem`);
    polygons need it. ``nonempty``: a mask without a pixel is a problem too.
    """
    if size is not None:
        problem = mask_size_problem(name, mask, size)
        if problem:
            raise ValueError(problem)
    try:
        arr = decode_mask(mask, *size) if size is not None else decode_mask(mask)
    except ValueError as e:
        kind = "bad RLE " if isinstance(mask, dict) else "bad polygon " if isinstance(mask, (list, tuple)) else ""
        raise ValueError(f"{name}: {kind}({e})" if kind else f"{name}: {e}") from None
    if nonempty and not arr.any():
        raise ValueError(f"{name} is empty")
    return arr


def _finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (a 400-digit int is not: it overflows)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _short(v: Any, limit: int = 60) -> str:
    try:
        text = repr(v)
    except RecursionError:
        return f"<{type(v).__name__}, nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def box_problem(name: str, box: Any, size: tuple[int, int] | None) -> str | None:
    """``box`` is 4 finite numbers ``[x1, y1, x2, y2]``, ``x1 ≤ x2``, ``y1 ≤ y2``, inside the ``(H, W)``
    image (``size``; when ``None`` only the start is checked) within :data:`BOX_TOLERANCE` pixels."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_finite_number(v) for v in box)):
        return f"{name} must be 4 finite numbers [x1, y1, x2, y2], got {_short(box)}"
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        return f"{name} {list(box)} has x2 < x1 or y2 < y1 (boxes are [x1, y1, x2, y2])"
    if x1 < -BOX_TOLERANCE or y1 < -BOX_TOLERANCE:
        return f"{name} {list(box)} starts outside the image"
    if size is not None and (x2 > size[1] + BOX_TOLERANCE or y2 > size[0] + BOX_TOLERANCE):
        return f"{name} {list(box)} ends outside the {size[1]}x{size[0]} (WxH) image"
    return None


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_mask_problem(name: str, box: Sequence[float], mask_box: Sequence[float], min_iou: float) -> str | None:
    """A region's ``box`` agrees with its mask's tight box: IoU ≥ ``min_iou`` or every side within
    :data:`BOX_MASK_TOLERANCE` pixels (catches xywh/xyxy mix-ups and masks paired with the wrong box)."""
    iou = _box_iou(box, mask_box)
    off = max(abs(float(g) - b) for g, b in zip(box, mask_box))
    if iou < min_iou and off > BOX_MASK_TOLERANCE:
        return (
            f"{name} {list(box)} disagrees with its mask's box {list(mask_box)} (IoU {iou:.2f} < {min_iou}); "
            "boxes are absolute pixel [x1, y1, x2, y2]"
        )
    return None


def record_head(record: dict, default: str) -> str:
    """The grounding head a record names, else ``default``; ``ValueError`` if it names a non-string."""
    head = record.get("head") or default
    if not isinstance(head, str):
        raise ValueError(f"'head' must be a string, got {type(head).__name__}")
    return head


def validate_record(
    record: Any,
    where: str,
    *,
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
    decode_masks: bool = True,
) -> list[str]:
    """Check one stored record; return the problems found (``"where: problem"``), none if valid.

    Checks: required keys and types; ``task`` in :data:`TASKS`; the messages
    (:func:`message_problems`) and an assistant turn without placeholders; the number of ``[SEG]`` in
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
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return [f"missing key(s): {', '.join(missing)}"]
    problems = _field_problems(record)
    messages = record["messages"]
    problems += message_problems(messages)
    messages = messages if isinstance(messages, list) else []
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
    problems += filter(None, [seg_count_problem(count_seg_tokens(messages), len(targets))])
    masks, boxes = _collect_masks_and_boxes(regions, targets, problems)
    if all(isinstance(r, dict) for r in regions):
        try:
            placeholder_region_indices({"messages": messages, "regions": regions})
        except ValueError as e:
            problems.append(str(e))
    size = _image_size_of(record, image_root, problems) if check_images else None
    problems += _mask_and_box_problems(masks, boxes, size, decode_masks)
    return problems


def _field_problems(record: dict) -> list[str]:
    """``id``, ``image``, ``task``, ``head`` and ``meta`` of a stored record."""
    problems = []
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
    return problems


def _collect_masks_and_boxes(
    regions: list, targets: list, problems: list[str]
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The (name, value) of every mask and box of the regions and targets; structure problems go to ``problems``."""
    masks: list[tuple[str, Any]] = []
    boxes: list[tuple[str, Any]] = []
    for i, r in enumerate(regions):
        problem = region_entry_problem(i, r, box_required=True)
        if problem:
            problems.append(problem)
            continue
        masks.append((f"regions[{i}].mask", r["mask"]))
        boxes.append((f"regions[{i}].box", r["box"]))
        ti = r.get("target_index")
        problems += filter(None, [target_index_problem(i, ti, len(targets))])
        ip = r.get("in_prompt", True)
        if not isinstance(ip, bool):
            problems.append(f"regions[{i}].in_prompt must be true or false")
        elif not ip and ti is None:
            problems.append(f"regions[{i}] has in_prompt false but no target_index (it would serve no purpose)")
    for j, t in enumerate(targets):
        problem = target_entry_problem(j, t, boxes_required=True)
        if problem:
            problems.append(problem)
        if isinstance(t, dict) and isinstance(t.get("masks"), list) and isinstance(t.get("boxes"), list):
            masks += [(f"targets[{j}].masks[{k}]", m) for k, m in enumerate(t["masks"])]
            boxes += [(f"targets[{j}].boxes[{k}]", b) for k, b in enumerate(t["boxes"])]
    return masks, boxes


def _image_size_of(record: dict, image_root: str | os.PathLike | None, problems: list[str]) -> tuple[int, int] | None:
    """``(H, W)`` of the record's image file; ``None`` (and a problem) when it is missing or does not open."""
    if not isinstance(record["image"], str) or not record["image"]:
        return None
    path = resolve_image_path(record["image"], image_root)
    if not path.is_file():
        problems.append(f"image not found: {path}")
        return None
    try:
        return image_size(path)
    except Exception as e:  # PIL raises several types for unreadable files
        problems.append(f"image does not open: {path} ({type(e).__name__}: {e})")
        return None


def _mask_and_box_problems(masks: list[tuple[str, Any]], boxes: list[tuple[str, Any]], size: tuple[int, int] | None,
                           decode: bool) -> list[str]:
    """Sizes (the image's when known, else the first RLE's, is the reference), masks and boxes."""
    problems: list[str] = []
    size_from = "the image"
    for name, m in masks:
        if size is None:
            size, size_from = _declared_size(m), name
        else:
            problems += filter(None, [mask_size_problem(name, m, size, size_from)])
    for name, m in masks:
        problems += _check_mask(name, m, size, decode)
    for name, b in boxes:
        problems += filter(None, [box_problem(name, b, size)])
    return problems


def _check_mask(name: str, m: Any, size: tuple[int, int] | None, decode: bool) -> list[str]:
    if isinstance(m, dict):
        if not decode:
            s, c = m.get("size"), m.get("counts")
            if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s)):
                return [f"{name}: bad RLE (size must be [H, W] with positive ints)"]
            if not isinstance(c, (str, list)):
                return [f"{name}: bad RLE (counts must be a string or a list)"]
            return []
    elif isinstance(m, list):
        if not m:
            return [f"{name}: empty polygon list"]
        for k, poly in enumerate(m):
            if not isinstance(poly, list) or not all(_finite_number(v) for v in poly):
                return [f"{name}: polygon {k} must be a flat list of numbers"]
            if len(poly) < 6 or len(poly) % 2:
                return [f"{name}: polygon {k} has {len(poly) / 2:g} points; at least 3 (x, y) pairs are needed"]
        if not decode or size is None:
            return []
    else:
        return [f"{name}: a mask must be an RLE object or a polygon list, got {type(m).__name__}"]
    try:  # an RLE is decoded at its own size (a size mismatch is reported once, above); polygons at the image's
        decode_record_mask(name, m, size if isinstance(m, list) else None, nonempty=True)
    except ValueError as e:
        return [str(e)]
    return []
