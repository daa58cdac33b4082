"""Robust referring segmentation (R-RefCOCO / R-RefCOCO+ / R-RefCOCOg)."""

from __future__ import annotations

import numpy as np

from . import rle as R
from .io import EvalInputError, EvalSet, dumps_id
from .result import TaskResult


def score_rrefcoco(es: EvalSet) -> TaskResult:
    """mRR, rIoU, mIoU, oIoU following robust-ref-seg ``utils/validation.py::validate`` (eval_mode
    "all", ``use_exist``).

    * one record per sentence with one target; a negative sentence has an empty target; the scoring
      unit is the referred object: records sharing ``meta.ref_id``;
    * the predicted mask of a sentence is its first ``[SEG]``'s union; a missing ``[SEG]`` or one that
      predicts no target (``exists`` < 0.5, as ``use_exist`` zeroes the output) is empty;
    * per ref: positives give ``I``, ``U`` and IoU = ``I / U``; a negative is FP if any pixel is
      predicted (its predicted area is then added to the ref's ``U``), else TN;
      ``mrr_ref`` = TN / (TN + FP); ``riou_ref`` = ΣI / (ΣU + Σ FP areas); ``miou_ref`` = mean IoU of
      its positives;
    * ``mrr``, ``riou``, ``miou`` = means over refs; ``oiou`` = ΣI / ΣU over all positive sentences
      (without the negatives' areas).
    Number types: ``use_exist`` zeroes the output when ``exist_pred < 0.5`` on a float32 tensor, so
    ``exists`` is compared as float32 here too (:attr:`fclm.metrics.io.PredSeg.no_target`). The official
    code also accumulates ``I``, ``U`` and the per-sentence IoU in float32 tensors; here they are exact
    integers and float64, which differs in the 7th significant digit at most and decides no threshold
    (the official P@0.5…0.9 are not reported).
    A ref without negatives makes the official ``mrr_ref`` NaN (0/0) and one without positives its
    ``miou_ref`` NaN: such refs are left out of that mean (``riou`` follows ``miou``), and counted.
    """
    res = TaskResult(hist_label="per-sentence IoU (positive sentences)")
    refs: dict[str, dict] = {}
    for gt, pred in es.pairs:
        if "ref_id" not in gt.meta:
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): R-RefCOCO records need meta.ref_id")
        if len(gt.targets) > 1:
            raise EvalInputError(f"{es.gt_path}:{gt.line} (id {gt.id!r}): R-RefCOCO records have one target per sentence, got {len(gt.targets)}")
        target = gt.targets[0].mask if gt.targets else None
        seg = pred.seg(0)
        pred_mask = None if seg is None else seg.target_mask
        ref = refs.setdefault(dumps_id(gt.meta["ref_id"]), {"ref_id": gt.meta["ref_id"], "pos": [], "neg": []})
        row = {"id": gt.id, "ref_id": gt.meta["ref_id"], "positive": target is not None}
        if target is not None:
            i, u = R.inter_union(pred_mask, target)
            ref["pos"].append((i, u))
            row.update(i=i, u=u, iou=i / u)
            res.hist.append(i / u)
        else:
            a = R.area(pred_mask)
            ref["neg"].append(a)
            row.update(pred_area=a, false_positive=a > 0)
        res.per_sample.append(row)

    mrr, riou, miou = [], [], []
    sum_i = sum_u = 0
    no_neg = no_pos = 0
    for ref in refs.values():
        if ref["neg"]:
            fp = sum(a > 0 for a in ref["neg"])
            mrr.append((len(ref["neg"]) - fp) / len(ref["neg"]))
        else:
            no_neg += 1
        if ref["pos"]:
            i = sum(p[0] for p in ref["pos"])
            u = sum(p[1] for p in ref["pos"])
            sum_i += i
            sum_u += u
            riou.append(i / (u + sum(a for a in ref["neg"] if a > 0)))
            miou.append(float(np.mean([p[0] / p[1] for p in ref["pos"]])))
        else:
            no_pos += 1
    n_pos = sum(len(r["pos"]) for r in refs.values())
    res.counts.update(n_refs=len(refs), n_sentences=len(es.pairs), n_positive=n_pos, n_negative=len(es.pairs) - n_pos, n_refs_without_negatives=no_neg, n_refs_without_positives=no_pos)
    if mrr:
        res.metrics["mrr"] = float(np.mean(mrr))
    else:
        res.notes.append("mrr not reported: no ref has negative sentences")
    if miou:
        res.metrics["riou"] = float(np.mean(riou))
        res.metrics["miou"] = float(np.mean(miou))
        res.metrics["oiou"] = sum_i / sum_u
    else:
        res.notes.append("riou/miou/oiou not reported: no ref has positive sentences")
    if no_neg:
        res.notes.append(f"{no_neg} ref(s) without negative sentences left out of mrr (the official code gives NaN)")
    if no_pos:
        res.notes.append(f"{no_pos} ref(s) without positive sentences left out of riou and miou (the official code gives NaN)")
    return res
