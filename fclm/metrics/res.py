"""Referring segmentation (RES, DL-RES) and referring comprehension (REC).

The scoring unit is one GT target (one ``[SEG]``): LISA's validation loops over every mask of a
sample and weights gIoU by the number of masks, so a record with k targets is k units (RefCOCO-style
records have one).
"""

from __future__ import annotations

import numpy as np

from . import rle as R
from .io import EvalInputError, EvalSet, PredSeg, as_float32
from .result import TaskResult

LISA_IOU_EPS = 1e-5
"""LISA ``train_ds.py::validate``: ``acc_iou += I / (U + 1e-5)``."""
LISA_CIOU_EPS = 1e-10
"""LISA ``train_ds.py::validate``: ``iou_class = ΣI / (ΣU + 1e-10)``."""
REC_IOU_THRESHOLD = 0.5
REC_IOU_DTYPE = np.float32
"""REC box IoU is computed as torchvision ``box_iou`` on float32 tensors (what torch-based REC
evaluators, e.g. MDETR's ``refexp.py``, compare with 0.5), so ``≥ 0.5`` is decided on the float32 value."""


def lisa_iou(inter: int, union: int) -> float:
    """Per-mask IoU as LISA accumulates it: ``I / (U + 1e-5)``, and 1 when ``U = 0`` (no-object target).

    Follows ``LISA/train_ds.py::validate`` (``acc_iou += I / (U + 1e-5); acc_iou[U == 0] += 1.0``).
    """
    return 1.0 if union == 0 else inter / (union + LISA_IOU_EPS)


def _seg_mask(seg: PredSeg | None):
    """A missing ``[SEG]`` or one that predicts no target is an empty mask."""
    return None if seg is None else seg.target_mask


def score_res(es: EvalSet) -> TaskResult:
    """gIoU / cIoU for RES and DL-RES, following LISA ``utils/utils.py::intersectionAndUnionGPU`` and
    ``train_ds.py::validate``.

    * unit = GT target k of a record, paired with predicted ``[SEG]`` k;
    * a missing ``[SEG]`` (fewer ``segs`` than targets) is an empty mask, never a skipped unit; a
      ``[SEG]`` that predicts no target (``exists`` < 0.5 or no instances) is an empty mask too;
      extra ``[SEG]``\\ s beyond the targets are ignored (LISA zips GT and predicted masks) and counted;
    * per unit ``I``, ``U`` in pixels; IoU = ``I / (U + 1e-5)``, 1 when ``U = 0``;
    * ``giou`` = mean unit IoU; ``ciou`` = ``ΣI / (ΣU + 1e-10)``.
    """
    res = TaskResult()
    sum_i = sum_u = 0
    ious = []
    n_missing_seg = n_extra_seg = n_no_target_rec = 0
    for gt, pred in es.pairs:
        if not gt.targets:
            n_no_target_rec += 1
        n_extra_seg += max(0, len(pred.segs) - len(gt.targets))
        for k, target in enumerate(gt.targets):
            seg = pred.seg(k)
            n_missing_seg += seg is None
            i, u = R.inter_union(_seg_mask(seg), target.mask)
            iou = lisa_iou(i, u)
            sum_i += i
            sum_u += u
            ious.append(iou)
            res.per_sample.append({"id": gt.id, "target": k, "i": i, "u": u, "iou": iou, "missing_seg": seg is None})
    res.counts.update(n_units=len(ious), n_missing_seg=n_missing_seg, n_extra_seg=n_extra_seg, n_records_without_targets=n_no_target_rec)
    if ious:
        res.metrics["giou"] = float(np.mean(ious))
        res.metrics["ciou"] = sum_i / (sum_u + LISA_CIOU_EPS)
    else:
        res.notes.append("no GT targets to score: giou/ciou not reported")
    if n_no_target_rec:
        res.notes.append(f"{n_no_target_rec} record(s) have no targets and add no unit (LISA has no such sample)")
    res.hist = ious
    return res


def top_box(seg: PredSeg | None) -> list[float] | None:
    """The REC answer of one ``[SEG]``: the box of its highest-scoring instance.

    A missing or no-target ``[SEG]`` has no box. A missing ``score`` counts as 1.0; ties keep the
    first instance; an instance without ``box`` uses its mask's tight box (``x2 = x + w``).
    """
    if seg is None or seg.no_target:
        return None
    best = max(range(len(seg.instances)), key=lambda j: (_score(seg.instances[j].score), -j))
    inst = seg.instances[best]
    return inst.box if inst.box is not None else R.to_box(inst.mask)


def _score(s: float | None) -> float:
    return 1.0 if s is None else as_float32(s)  # ranked as the float32 tensor the model's scores come in


def score_rec(es: EvalSet) -> TaskResult:
    """REC ``acc_05``: share of units whose top-scoring predicted box has IoU ≥ 0.5 with the GT box.

    Unit and missing-``[SEG]`` rules as :func:`score_res` (a missing or no-target ``[SEG]`` is a miss).
    The GT box is the target's single box, or the tight box of its mask when it has no box; a target
    with several boxes or none at all is an input error (REC refers to exactly one object).
    Box IoU on absolute pixel xyxy boxes, no +1 (pycocotools / torchvision convention), in float32
    (:data:`REC_IOU_DTYPE`): a pair at IoU 0.5000000000000001 in float64 can be 0.49999997 there.
    Scores are ranked as float32 (equal float32 scores: the first instance).
    When every GT target has a mask and every predicted instance has one, mask ``giou``/``ciou``
    are reported too, with :func:`score_res`'s conventions.
    """
    res = TaskResult()
    hits = []
    mask_ok = all(t.mask is not None for gt, _ in es.pairs for t in gt.targets) and all(
        inst.mask is not None for _, pred in es.pairs for s in pred.segs for inst in s.instances
    )
    for gt, pred in es.pairs:
        for k, target in enumerate(gt.targets):
            if len(target.boxes) > 1:
                raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): REC target {k} has {len(target.boxes)} boxes; REC refers to one object")
            if len(target.boxes) == 1:
                gt_box = target.boxes[0]
            elif target.mask is not None:
                gt_box = np.asarray(R.to_box(target.mask))
            else:
                raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): REC target {k} has neither a box nor a mask")
            box = top_box(pred.seg(k))
            iou = 0.0 if box is None else float(R.box_iou_matrix(np.asarray(box), gt_box, dtype=REC_IOU_DTYPE)[0, 0])
            hit = iou >= REC_IOU_THRESHOLD
            hits.append(hit)
            row = {"id": gt.id, "target": k, "box_iou": iou, "hit": hit, "pred_box": box}
            res.per_sample.append(row)
    res.counts["n_units"] = len(hits)
    if hits:
        res.metrics["acc_05"] = float(np.mean(hits))
    else:
        res.notes.append("no GT targets to score: acc_05 not reported")
    res.hist = [r["box_iou"] for r in res.per_sample]
    res.hist_label = "per-sample box IoU of the top-scoring box"
    if mask_ok and hits:
        masks = score_res(es)
        res.metrics.update({k: masks.metrics[k] for k in ("giou", "ciou") if k in masks.metrics})
        for row, mrow in zip(res.per_sample, masks.per_sample):
            row.update(i=mrow["i"], u=mrow["u"], iou=mrow["iou"])
    elif hits:
        res.notes.append("mask giou/ciou not reported: some GT targets or predicted instances have no mask")
    return res
