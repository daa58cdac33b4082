"""Generalized referring segmentation (gRefCOCO GRES), as ReLA scores it."""

from __future__ import annotations

import numpy as np

from . import rle as R
from .io import EvalSet, GTTarget
from .result import TaskResult

PR_THRESHOLDS = (0.7, 0.8, 0.9)


def gres_units(es: EvalSet):
    """Yield ``(gt, k, target, seg)`` per unit: GT target k with predicted ``[SEG]`` k.

    A record with no targets is one no-target unit (k = 0); a missing ``[SEG]`` is ``None``.
    """
    for gt, pred in es.pairs:
        targets = gt.targets or [GTTarget(masks=[], boxes=np.zeros((0, 4)))]
        for k, target in enumerate(targets):
            yield gt, k, target, pred.seg(k)


def score_gres(es: EvalSet) -> TaskResult:
    """gIoU, cIoU, N-acc, T-acc, Pr@0.7/0.8/0.9 following ReLA ``gres_model/evaluation/refer_evaluation.py``
    (``ReferEvaluator.evaluate``).

    Per unit, with the predicted ``[SEG]``'s union mask and its no-target flag (``exists`` < 0.5, no
    instances, or a missing ``[SEG]``):

    * GT empty, predicted no-target → TP: IoU 1, nothing added to ΣI / ΣU;
    * GT empty, predicted target → FN: IoU 0, ``U`` (the predicted area) added to ΣU;
    * GT target, predicted no-target → FP: ``I = 0``, ``U = |pred ∪ gt|`` kept (the predicted mask
      still counts in the union, as in ReLA), IoU 0;
    * GT target, predicted target → TN: IoU = ``I / U`` (0 when ``U = 0``).

    ``giou`` = mean IoU over all units; ``ciou`` = ΣI / ΣU; ``n_acc`` = TP / (TP + FN) over no-target
    units; ``t_acc`` = TN / (TN + FP) over target units; ``pr_07/08/09`` = share of target units with
    IoU ≥ 0.7 / 0.8 / 0.9. (ReLA names the no-target hit "TP".)

    Number types as ReLA's: the IoU is ``float(I) / float(U)`` of integer pixel counts, in float64,
    so ``7 / 10`` is exactly 0.7 and counts for Pr@0.7 in both. ReLA decides no-target by the argmax of
    two float32 logits (a tie is a target); here ``exists`` < 0.5 is decided on its float32 value
    (:attr:`fclm.metrics.io.PredSeg.no_target`), so 0.49999999999 (float32 0.5) predicts a target. Where ReLA would divide by zero or
    print a placeholder 0 (no no-target units → N-acc), the key is left out and a note says why;
    ReLA also prints 0 for T-acc when there are no no-target units, while here ``t_acc`` is reported
    whenever target units exist (it is well defined).
    """
    res = TaskResult()
    sum_i = sum_u = 0
    sum_iou = 0.0
    nt = {"TP": 0, "FN": 0, "TN": 0, "FP": 0}
    pr = {t: 0 for t in PR_THRESHOLDS}
    n_total = n_empty = n_target = 0
    for gt, k, target, seg in gres_units(es):
        gt_nt = target.mask is None
        pred_nt = seg is None or seg.no_target
        pred_mask = None if seg is None else seg.mask
        i, u = R.inter_union(pred_mask, target.mask)
        if gt_nt:
            n_empty += 1
            if pred_nt:
                outcome, i, u, iou = "TP", 0, 0, 1.0
            else:
                outcome, i, iou = "FN", 0, 0.0
        else:
            n_target += 1
            if pred_nt:
                outcome, i = "FP", 0
            else:
                outcome = "TN"
            iou = 0.0 if u == 0 else i / u
            for t in PR_THRESHOLDS:
                pr[t] += iou >= t
        nt[outcome] += 1
        n_total += 1
        sum_i += i
        sum_u += u
        sum_iou += iou
        res.per_sample.append({"id": gt.id, "target": k, "gt_no_target": gt_nt, "pred_no_target": pred_nt, "outcome": outcome, "i": i, "u": u, "iou": iou})
        res.hist.append(iou)
    res.counts.update(n_units=n_total, n_no_target=n_empty, n_target=n_target, **{f"n_{k.lower()}": v for k, v in nt.items()})
    res.metrics["giou"] = sum_iou / n_total
    if sum_u > 0:
        res.metrics["ciou"] = sum_i / sum_u
    else:
        res.notes.append("ciou not reported: ΣU = 0 (every unit is a correctly predicted no-target)")
    if n_empty:
        res.metrics["n_acc"] = nt["TP"] / (nt["TP"] + nt["FN"])
    else:
        res.notes.append("n_acc not reported: no no-target units (ReLA prints 0 here)")
    if n_target:
        res.metrics["t_acc"] = nt["TN"] / (nt["TN"] + nt["FP"])
        for t, key in zip(PR_THRESHOLDS, ("pr_07", "pr_08", "pr_09")):
            res.metrics[key] = pr[t] / n_target
    else:
        res.notes.append("t_acc and pr_07/08/09 not reported: no units with a target")
    return res
