"""Reading a ground-truth JSONL and a prediction JSONL into matched, validated pairs.

Ground truth: the FCLM record schema (``shared/DESIGN.md`` §4) — ``id``, ``image`` (relative to the GT
file), ``task``, ``messages``, ``targets`` (one per ``[SEG]``: ``{"masks": [RLE…], "boxes": [[x1, y1,
x2, y2]…]}``, an empty target = no target), ``meta``.

Predictions, one line per GT record::

    {"id": …, "text": "…", "segs": [{"instances": [{"mask": RLE, "box": [x1, y1, x2, y2],
                                                   "score": 0.93}], "exists": 0.97}]}

one ``segs`` entry per predicted ``[SEG]``, in order; ``box``, ``score`` and ``exists`` are optional.
``mask`` is COCO RLE ``{"size": [H, W], "counts": "…"}`` (compressed string, or a list of run lengths)
at the image's size; ``box`` is absolute pixels ``[x1, y1, x2, y2]``; ``score`` ranks the instances
of a ``[SEG]`` (REC takes the best, GREC keeps those ≥ 0.7; missing = 1.0); ``exists`` < 0.5 says the
``[SEG]`` refers to nothing (no target). Numbers are compared as the official evaluators hold them:
``score`` and ``exists`` as float32 (see :func:`as_float32`).

What loading guarantees (every error is one line naming the file, line and id):

* a malformed line (bad JSON, invalid UTF-8, a lone surrogate escape, nesting deeper than
  ``fclm.io.MAX_JSON_DEPTH``, a number Python cannot read) → :class:`EvalInputError` naming
  ``file:line``. Such a line is fatal, in both files, rather than skipped: a skipped GT line would
  silently change the score (its record would drop out of every mean), and a skipped prediction
  line would be scored as an empty prediction without the file being fixed;
* ids are compared as strings (``7`` and ``"7"`` are the same record);
* duplicate ids (in either file) → error naming both lines;
* a malformed RLE → error naming the mask: a bad size (not two positive ints, more than
  ``fclm.masks.MAX_MASK_PIXELS``), or counts that are not exactly a run-length string covering H×W
  (checked for every mask of both files, vectorised, by :func:`fclm.metrics.rle.check_rles`: a string
  missing its last characters would otherwise make pycocotools loop for ever or read past its end);
* a GT polygon with a non-finite, huge or far-off coordinate → error naming the mask;
* a ``score``, ``exists`` or box coordinate that is not a finite float32 number (``NaN``, ``Infinity``, ``1e308``,
  ``1e400``) → error naming it;
* prediction ids absent from the GT → one error listing them;
* GT ids without a prediction → scored as an empty prediction (no ``[SEG]``, empty text) and counted;
* every mask of a record (GT and prediction) must have the image's size; the size is read from the
  record's own RLE ``size`` fields, so images are not opened, except to rasterise a GT polygon or,
  when a GT record has no masks but its prediction has, to read the image header (PIL, lazily) if
  the file is present — otherwise the prediction masks must at least agree with each other;
* masks are converted to pycocotools RLE once, here; unions (a GT target's instances, a predicted
  ``[SEG]``'s instances) are computed once, here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from fclm.io import RecordError, iter_jsonl
from fclm.masks import MAX_MASK_PIXELS, _to_coco_rle, polygons_to_rle

from . import rle as R

MAX_LISTED = 10
_NO_BOXES = np.zeros((0, 4), dtype=np.float64)
_NO_BOXES.flags.writeable = False


class EvalInputError(ValueError):
    """The inputs of a scoring run are unusable; the message says where and why (one line)."""


NO_TARGET_THRESHOLD = 0.5
"""A ``[SEG]`` with ``exists`` below this predicts no target."""


def as_float32(v: float) -> float:
    """``v`` rounded to float32, as a Python float: the value an official evaluator holding its model's
    outputs in a float32 tensor compares. gRefCOCO's ``refexp.py`` takes ``scores.tolist()`` of a
    float32 tensor and compares with the Python float 0.7, so a score of exactly 0.7 (float32
    0.699999988…) is dropped; R-RefCOCO's ``exist_pred < 0.5`` compares a float32 tensor. Values a
    float32 model wrote are unchanged; decimal values typed by hand may move by one float32 ulp."""
    return float(np.float32(v))


@dataclass
class GTTarget:
    """One ground-truth ``[SEG]`` target: its instance masks and boxes, and their union ``mask``."""

    masks: list[R.Rle]
    boxes: np.ndarray  # K×4 float64 xyxy, possibly 0×4
    mask: Optional[R.Rle] = None  # union of ``masks``; None when there are none

    @property
    def empty(self) -> bool:
        """A no-target target: neither masks nor boxes."""
        return not self.masks and len(self.boxes) == 0

    @property
    def n_instances(self) -> int:
        return max(len(self.masks), len(self.boxes))

    def instance_boxes(self) -> np.ndarray:
        """Instance boxes: the given boxes, else the tight boxes of the instance masks (K×4)."""
        if len(self.boxes):
            return self.boxes
        return np.asarray([R.to_box(m) for m in self.masks], dtype=np.float64).reshape(-1, 4)


@dataclass
class GTRecord:
    id: str
    line: int
    image: str
    root: Path  # the GT file's folder; image paths are relative to it
    task: str
    messages: list[dict]
    targets: list[GTTarget]
    meta: dict
    size: Optional[tuple[int, int]]  # (H, W): from its GT masks, else the image header, else its predicted masks

    @property
    def image_path(self) -> Path:
        return self.root / self.image if self.image else self.root

    @property
    def assistant(self) -> str:
        """The assistant turns' contents, joined with a newline."""
        return "\n".join(str(m.get("content", "")) for m in self.messages if m.get("role") == "assistant")


@dataclass
class PredInstance:
    mask: Optional[R.Rle]
    box: Optional[list[float]]
    score: Optional[float]


@dataclass
class PredSeg:
    """One predicted ``[SEG]``. ``mask`` is the union of its instance masks (None if there are none)."""

    instances: list[PredInstance]
    exists: Optional[float]
    mask: Optional[R.Rle] = None

    @property
    def no_target(self) -> bool:
        """True iff ``exists`` is given and < 0.5 as float32 (:func:`as_float32`; R-RefCOCO's
        ``exist_pred < 0.5`` on a float32 tensor, ReLA's argmax of float32 logits, where a tie is a
        target), or the ``[SEG]`` has no instances."""
        return (self.exists is not None and as_float32(self.exists) < NO_TARGET_THRESHOLD) or not self.instances

    @property
    def target_mask(self) -> Optional[R.Rle]:
        """The mask this ``[SEG]`` asserts: its union, or empty (None) when it predicts no target."""
        return None if self.no_target else self.mask


@dataclass
class PredRecord:
    id: str
    line: int  # 0 for a missing prediction
    text: str
    segs: list[PredSeg]
    missing: bool = False

    def seg(self, k: int) -> Optional[PredSeg]:
        """The ``k``-th predicted ``[SEG]``, or None when fewer were predicted."""
        return self.segs[k] if k < len(self.segs) else None


@dataclass
class EvalSet:
    """GT records paired with their predictions, in GT file order."""

    gt_path: Path
    pred_path: Path
    pairs: list[tuple[GTRecord, PredRecord]]
    missing_ids: list[str] = field(default_factory=list)
    gt_task_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_missing_pred(self) -> int:
        return len(self.missing_ids)


def _list_ids(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED])
    return shown + (f" … and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


_LENIENT_SUFFIX = "; line skipped"


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Every record of a JSONL file; the first bad line is fatal (see the module docstring)."""
    if not path.is_file():
        raise EvalInputError(f"{path}: no such file")
    out: list[tuple[int, dict]] = []
    try:
        for item in iter_jsonl(path):
            out.append(item)
    except RecordError as e:
        problem = e.problem[: -len(_LENIENT_SUFFIX)] if e.problem.endswith(_LENIENT_SUFFIX) else e.problem
        raise EvalInputError(f"{e.where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise EvalInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EvalInputError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        # json's own limits that iter_jsonl does not turn into a RecordError (an integer of more than
        # 4,300 digits is a plain ValueError): the line is the next non-blank one after the last read.
        line = _next_nonblank_line(path, out[-1][0] if out else 0)
        why = str(e).split(";")[0] if isinstance(e, ValueError) else type(e).__name__
        raise EvalInputError(f"{path}:{line}: unreadable JSON ({why})") from None
    return out


def _next_nonblank_line(path: Path, after: int) -> int:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno > after and raw.strip():
                return lineno
    return after + 1


def _record_id(obj: dict, where: str) -> str:
    if "id" not in obj:
        raise EvalInputError(f"{where}: record has no 'id'")
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise EvalInputError(f"{where}: 'id' must be a string or an integer, got {type(rid).__name__}")
    return str(rid)


def _convert_rle(obj: Any, at: Callable[[], str]) -> R.Rle:
    """Validate a JSON RLE dict's form and return it in pycocotools form (bytes counts).

    ``at()`` names the mask in an error message (built only on error). Run-length consistency is
    checked afterwards for all masks at once (:func:`_check_areas`)."""
    size, counts = (obj.get("size"), obj.get("counts")) if type(obj) is dict else (None, None)
    if type(counts) is str and type(size) is list and len(size) == 2 and type(size[0]) is int and type(size[1]) is int and size[0] > 0 and size[1] > 0 and size[0] * size[1] <= MAX_MASK_PIXELS and counts.isascii():
        return {"size": size, "counts": counts.encode("ascii")}  # the common case, checked inline for speed
    try:
        coco = _to_coco_rle(obj)
    except (ValueError, TypeError) as e:
        raise EvalInputError(f"{at()}: bad RLE mask ({e})") from None
    return {"size": [int(coco["size"][0]), int(coco["size"][1])], "counts": coco["counts"]}


def _check_areas(rles: list[R.Rle], at: Callable[[int], str]) -> None:
    """The exact check of every mask of a file at once (:func:`fclm.metrics.rle.check_rles`: run
    lengths non-negative and covering H×W, so pycocotools can neither loop for ever nor read past a
    string); each mask's area is kept for the metrics (``R.area``). Runs before any pycocotools call
    on these masks."""
    try:
        areas = R.check_rles(rles)
    except R.RleError as e:
        raise EvalInputError(f"{at(e.index)}: {e.problem}") from None
    for r, a in zip(rles, areas.tolist()):
        r[R.AREA_KEY] = a


def _field(obj: dict, key: str, default: Any) -> Any:
    """``obj[key]``, or ``default`` when absent or null (a wrong type is left for the caller to report)."""
    v = obj.get(key)
    return default if v is None else v


FLOAT32_MAX = 3.4028234663852886e38
"""Scores, boxes and ``exists`` are compared in float32 (the official code's dtype): larger magnitudes are refused."""


def _finite(v: Any) -> Optional[float]:
    """``float(v)`` for a JSON number (not a bool) that is finite in float32, else None."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer beyond the float range
        return None
    return f if math.isfinite(f) and abs(f) <= FLOAT32_MAX else None


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _box(obj: Any, at: Callable[[], str]) -> list[float]:
    if not (isinstance(obj, (list, tuple)) and len(obj) == 4):
        raise EvalInputError(f"{at()}: a box must be [x1, y1, x2, y2] numbers, got {_short(obj)}")
    box = [_finite(v) for v in obj]
    if any(v is None for v in box):
        raise EvalInputError(f"{at()}: a box must be [x1, y1, x2, y2] finite numbers, got {_short(obj)}")
    return box  # type: ignore[return-value]


def _number(obj: Any, at: Callable[[], str]) -> float:
    v = _finite(obj)
    if v is None:
        raise EvalInputError(f"{at()}: expected a finite number, got {_short(obj)}")
    return v


def _image_size(path: Path) -> Optional[tuple[int, int]]:
    """(H, W) from the image header, or None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except OSError:
        return None
    return int(h), int(w)


def _parse_gt(obj: dict, line: int, path_s: str, root: Path, rid: str, need_masks: bool, rles: list, locs: list) -> GTRecord:
    def at(suffix: str = "") -> str:
        return f"{path_s}:{line} (id {rid!r}){suffix}"

    image = _field(obj, "image", "")
    if not isinstance(image, str):
        raise EvalInputError(f"{at()}: 'image' must be a string")
    messages = _field(obj, "messages", [])
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise EvalInputError(f"{at()}: 'messages' must be a list of {{role, content}} objects")
    meta = _field(obj, "meta", {})
    if not isinstance(meta, dict):
        raise EvalInputError(f"{at()}: 'meta' must be an object")
    raw_targets = _field(obj, "targets", [])
    if not isinstance(raw_targets, list):
        raise EvalInputError(f"{at()}: 'targets' must be a list")

    # First pass: RLE sizes, so that polygons can be rasterised at the image size.
    sizes: set[tuple[int, int]] = set()
    has_polygon = False
    for t in raw_targets:
        if not isinstance(t, dict):
            raise EvalInputError(f"{at()}: each target must be an object with 'masks' and 'boxes'")
        if not isinstance(_field(t, "masks", []), list):
            raise EvalInputError(f"{at()}: a target's 'masks' must be a list")
        for m in _field(t, "masks", []):
            if isinstance(m, dict) and isinstance(m.get("size"), (list, tuple)) and len(m["size"]) == 2 and all(type(v) is int for v in m["size"]):
                sizes.add((m["size"][0], m["size"][1]))  # a malformed size is reported by _convert_rle
            elif isinstance(m, (list, tuple)):
                has_polygon = True
    if len(sizes) > 1:
        raise EvalInputError(f"{at()}: GT masks have different sizes {sorted(list(s) for s in sizes)}")
    size = next(iter(sizes)) if sizes else None
    if has_polygon and size is None:
        image_path = root / image
        size = _image_size(image_path) if image else None
        if size is None:
            raise EvalInputError(f"{at()}: GT polygons need the image size, but no RLE mask gives it and the image ({image_path if image else 'none given'}) cannot be read")

    targets = []
    for k, t in enumerate(raw_targets):
        masks = []
        for j, m in enumerate(_field(t, "masks", [])):
            if isinstance(m, (list, tuple)):
                try:
                    m = polygons_to_rle(m, size[0], size[1])
                except (ValueError, TypeError, OverflowError) as e:
                    raise EvalInputError(f"{at(f': targets[{k}].masks[{j}]')}: bad polygon ({e})") from None
            r = _convert_rle(m, lambda: at(f": targets[{k}].masks[{j}]"))
            masks.append(r)
            rles.append(r)
            locs.append((line, rid, f"targets[{k}].masks[{j}]"))
        raw_boxes = _field(t, "boxes", [])
        if not isinstance(raw_boxes, list):
            raise EvalInputError(f"{at()}: targets[{k}].boxes must be a list")
        if raw_boxes:
            boxes = np.asarray([_box(b, lambda: at(f": targets[{k}].boxes[{j}]")) for j, b in enumerate(raw_boxes)], dtype=np.float64).reshape(-1, 4)
        else:
            boxes = _NO_BOXES
        if need_masks and boxes.shape[0] and not masks:
            raise EvalInputError(f"{at()}: targets[{k}] has boxes but no masks; this task scores masks")
        targets.append(GTTarget(masks=masks, boxes=boxes))
    return GTRecord(
        id=rid,
        line=line,
        image=image,
        root=root,
        task=str(obj.get("task", "")),
        messages=messages,
        targets=targets,
        meta=meta,
        size=(int(size[0]), int(size[1])) if size else None,
    )


def _parse_pred(obj: dict, line: int, path_s: str, rid: str, need_masks: bool, rles: list, locs: list) -> PredRecord:
    def at(suffix: str = "") -> str:
        return f"{path_s}:{line} (id {rid!r}){suffix}"

    text = obj.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise EvalInputError(f"{at()}: 'text' must be a string")
    raw_segs = _field(obj, "segs", [])
    if not isinstance(raw_segs, list):
        raise EvalInputError(f"{at()}: 'segs' must be a list")
    segs = []
    for k, s in enumerate(raw_segs):
        if not isinstance(s, dict):
            raise EvalInputError(f"{at(f': segs[{k}]')}: must be an object with 'instances'")
        exists = s.get("exists")
        if exists is not None:
            exists = _number(exists, lambda: at(f": segs[{k}].exists"))
        raw_inst = _field(s, "instances", [])
        if not isinstance(raw_inst, list):
            raise EvalInputError(f"{at(f': segs[{k}].instances')} must be a list")
        instances = []
        for j, inst in enumerate(raw_inst):
            if not isinstance(inst, dict):
                raise EvalInputError(f"{at(f': segs[{k}].instances[{j}]')}: must be an object")
            mask = inst.get("mask")
            if mask is not None:
                if not isinstance(mask, dict):
                    raise EvalInputError(f"{at(f': segs[{k}].instances[{j}].mask')} must be an RLE object {{size, counts}}")
                mask = _convert_rle(mask, lambda: at(f": segs[{k}].instances[{j}].mask"))
                rles.append(mask)
                locs.append((line, rid, f"segs[{k}].instances[{j}].mask"))
            elif need_masks:
                raise EvalInputError(f"{at(f': segs[{k}].instances[{j}]')}: no 'mask'; this task scores masks")
            box = inst.get("box")
            if box is not None:
                box = _box(box, lambda: at(f": segs[{k}].instances[{j}].box"))
            elif mask is None:
                raise EvalInputError(f"{at(f': segs[{k}].instances[{j}]')}: has neither 'mask' nor 'box'")
            score = inst.get("score")
            if score is not None:
                score = _number(score, lambda: at(f": segs[{k}].instances[{j}].score"))
            instances.append(PredInstance(mask=mask, box=box, score=score))
        segs.append(PredSeg(instances=instances, exists=exists))
    return PredRecord(id=rid, line=line, text=text, segs=segs)


def _check_sizes(gt: GTRecord, pred: PredRecord, pred_path: Path) -> None:
    """Every predicted mask must have the image size; then compute the ``[SEG]`` unions."""
    sized = [(k, j, inst.mask) for k, s in enumerate(pred.segs) for j, inst in enumerate(s.instances) if inst.mask is not None]
    if sized:
        size = gt.size
        source = "image size"
        if size is None:
            size = _image_size(gt.image_path)
            if size is not None:
                gt.size = size
        if size is None:  # no GT mask, no readable image: the prediction masks must agree with each other
            size = tuple(sized[0][2]["size"])
            source = f"size of segs[{sized[0][0]}].instances[{sized[0][1]}].mask"
            gt.size = (int(size[0]), int(size[1]))
        for k, j, m in sized:
            if tuple(m["size"]) != tuple(size):
                raise EvalInputError(
                    f"{pred_path}:{pred.line} (id {pred.id!r}): segs[{k}].instances[{j}].mask has size "
                    f"{list(m['size'])}, but the {source} is {list(size)}"
                )
    for s in pred.segs:
        s.mask = R.union([i.mask for i in s.instances if i.mask is not None])


def load_eval_set(gt_path: str | Path, pred_path: str | Path, *, need_masks: bool = True) -> EvalSet:
    """Read, validate and pair a GT JSONL and a prediction JSONL (see the module docstring).

    ``need_masks``: the task scores masks, so a predicted instance or a non-empty GT target without a
    mask is an error (box tasks — REC, GREC — pass False).
    Raises :class:`EvalInputError` with a one-line message on any bad input.
    """
    gt_path, pred_path = Path(gt_path), Path(pred_path)
    root = gt_path.parent
    gt_s, pred_s = str(gt_path), str(pred_path)
    rles: list[R.Rle] = []
    locs: list[tuple[int, str, str]] = []
    gts: dict[str, GTRecord] = {}
    order: list[str] = []
    task_counts: dict[str, int] = {}
    for line, obj in _read_jsonl(gt_path):
        rid = _record_id(obj, f"{gt_path}:{line}")
        if rid in gts:
            raise EvalInputError(f"{gt_path}:{line}: duplicate id {rid!r} (first at line {gts[rid].line})")
        gts[rid] = _parse_gt(obj, line, gt_s, root, rid, need_masks, rles, locs)
        order.append(rid)
        task_counts[gts[rid].task] = task_counts.get(gts[rid].task, 0) + 1
    if not gts:
        raise EvalInputError(f"{gt_path}: no records")
    _check_areas(rles, lambda n: f"{gt_s}:{locs[n][0]} (id {locs[n][1]!r}): {locs[n][2]}")
    for g in gts.values():
        for t in g.targets:
            t.mask = R.union(t.masks)
    rles, locs = [], []

    preds: dict[str, PredRecord] = {}
    unknown: list[str] = []
    for line, obj in _read_jsonl(pred_path):
        rid = _record_id(obj, f"{pred_path}:{line}")
        if rid in preds:
            raise EvalInputError(f"{pred_path}:{line}: duplicate id {rid!r} (first at line {preds[rid].line})")
        if rid not in gts:
            unknown.append(rid)
            preds[rid] = PredRecord(id=rid, line=line, text="", segs=[])
            continue
        preds[rid] = _parse_pred(obj, line, pred_s, rid, need_masks, rles, locs)
    if unknown:
        raise EvalInputError(f"{pred_path}: {len(unknown)} prediction id(s) not in {gt_path}: {_list_ids(unknown)}")
    _check_areas(rles, lambda n: f"{pred_s}:{locs[n][0]} (id {locs[n][1]!r}): {locs[n][2]}")

    pairs = []
    missing = []
    for rid in order:
        gt = gts[rid]
        pred = preds.get(rid)
        if pred is None:
            pred = PredRecord(id=rid, line=0, text="", segs=[], missing=True)
            missing.append(rid)
        _check_sizes(gt, pred, pred_path)
        pairs.append((gt, pred))
    return EvalSet(gt_path=gt_path, pred_path=pred_path, pairs=pairs, missing_ids=missing, gt_task_counts=task_counts)


def dumps_id(rid: Any) -> str:
    """A stable string key for a JSON value used as a grouping id (``meta.ref_id``)."""
    return json.dumps(rid, sort_keys=True)
