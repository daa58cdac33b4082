"""Ref-ZOM: referring segmentation with zero, one or many targets."""

from __future__ import annotations

import numpy as np

from . import rle as R
from .io import EvalInputError, EvalSet
from .result import TaskResult


def zom_category(n_instances: int) -> str:
    """Ref-ZOM source type from the instance count of the target: 0 → zero, 1 → one, ≥ 2 → many."""
    return "zero" if n_instances == 0 else ("one" if n_instances == 1 else "many")


def score_refzom(es: EvalSet) -> TaskResult:
    """oIoU, mIoU and Acc following RIS-DMMI ``test.py::evaluate`` and ``computeIoU``.

    * one record per sentence with one target; its category is zero / one / many by instance count;
    * the prediction is the first ``[SEG]``'s union; missing or no-target ``[SEG]`` = empty mask;
    * ``acc`` = share of zero sentences with an empty prediction (no predicted pixel);
    * one/many sentences: ``I``, ``U``; IoU = ``I / U`` (0 when ``U = 0``); ``miou`` = mean IoU,
      ``oiou`` = ΣI / ΣU over them.

    Number types as RIS-DMMI's: numpy integer pixel counts, IoU in float64 (no threshold is reported);
    a ``[SEG]``'s ``exists`` < 0.5 is decided on its float32 value, as every task here does.
    """
    res = TaskResult(hist_label="per-sentence IoU (one/many sentences)")
    accs, ious = [], []
    sum_i = sum_u = 0
    counts = {"zero": 0, "one": 0, "many": 0}
    for gt, pred in es.pairs:
        if len(gt.targets) > 1:
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): Ref-ZOM records have one target per sentence, got {len(gt.targets)}")
        target = gt.targets[0] if gt.targets else None
        cat = zom_category(len(target.masks) if target else 0)
        counts[cat] += 1
        seg = pred.seg(0)
        pred_mask = None if seg is None else seg.target_mask
        row = {"id": gt.id, "category": cat}
        if cat == "zero":
            a = R.area(pred_mask)
            accs.append(a == 0)
            row.update(pred_area=a, correct=a == 0)
        else:
            i, u = R.inter_union(pred_mask, target.mask)
            iou = 0.0 if u == 0 else i / u
            sum_i += i
            sum_u += u
            ious.append(iou)
            row.update(i=i, u=u, iou=iou)
        res.per_sample.append(row)
    res.hist = ious
    res.counts.update(n_sentences=len(es.pairs), n_zero=counts["zero"], n_one=counts["one"], n_many=counts["many"])
    if accs:
        res.metrics["acc"] = float(np.mean(accs))
    else:
        res.notes.append("acc not reported: no zero-target sentences")
    if ious:
        res.metrics["miou"] = float(np.mean(ious))
        if sum_u > 0:
            res.metrics["oiou"] = sum_i / sum_u
    else:
        res.notes.append("miou/oiou not reported: no one- or many-target sentences")
    return res
