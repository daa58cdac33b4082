"""Generalized referring expression comprehension (gRefCOCO GREC).

Number types, as in gRefCOCO ``mdetr/datasets/refexp.py`` (``RefExpEvaluator.summarize``): the model's
scores are a float32 tensor, read with ``.tolist()`` and compared with the Python float 0.7, so a
score is rounded to float32 before ``>= 0.7`` (:func:`fclm.metrics.io.as_float32`): a score written
as exactly 0.7 is float32 0.699999988 and dropped there, and here. Boxes are float32 tensors and
``generalized_box_iou`` runs in float32; the match test ``top_value < 0.5`` is decided on that
float32 value, so the overlaps here are computed in float32 too, operation for operation
(:func:`fclm.metrics.rle.generalized_box_iou_matrix` with ``dtype=np.float32``). ``f1score`` (IoU
matching, not in the official code) follows the same rules.
"""

from __future__ import annotations

import numpy as np

from . import rle as R
from .gres import gres_units
from .io import EvalSet, PredSeg, as_float32
from .result import TaskResult

GREC_SCORE_THRESHOLD = 0.7
GREC_MATCH_THRESHOLD = 0.5
GREC_F1_THRESHOLD = 1.0
GREC_OVERLAP_DTYPE = np.float32
"""Boxes and overlaps are float32, as the official evaluator's tensors."""


def grec_pred_boxes(seg: PredSeg | None, score_threshold: float = GREC_SCORE_THRESHOLD) -> np.ndarray:
    """The boxes a ``[SEG]`` keeps: instances whose score, rounded to float32, is ≥ 0.7, sorted by
    descending (float32) score (N×4).

    A missing or no-target ``[SEG]`` keeps none. A missing ``score`` counts as 1.0 (kept). Equal
    (float32) scores keep instance order (stable sort; gRefCOCO sorts ``(score, box)`` tuples, which breaks ties
    by box coordinates — irrelevant to F1 except in exact ties). An instance without ``box`` uses its
    mask's tight box.
    """
    if seg is None or seg.no_target:
        return np.zeros((0, 4))
    kept = [(1.0 if i.score is None else as_float32(i.score), j, i) for j, i in enumerate(seg.instances)]
    kept = [x for x in kept if x[0] >= score_threshold]
    kept.sort(key=lambda x: (-x[0], x[1]))
    return np.asarray([i.box if i.box is not None else R.to_box(i.mask) for _, _, i in kept], dtype=np.float64).reshape(-1, 4)


def greedy_match_count(overlap: np.ndarray, threshold: float = GREC_MATCH_THRESHOLD) -> int:
    """Greedy one-to-one matching of gRefCOCO ``RefExpEvaluator.summarize`` (``mdetr/datasets/refexp.py``).

    Up to ``min(P, G)`` times: take the highest entry of the P×G ``overlap`` matrix; stop if it is
    below ``threshold``; else count a match and zero its row and column. Ties go to the lowest
    flattened (row-major) index, i.e. the higher-scoring prediction, then the lower GT index.
    Returns the number of matches (TP).
    """
    m = np.array(overlap, dtype=np.float64, copy=True)
    if m.size == 0:
        return 0
    tp = 0
    for _ in range(min(m.shape)):
        flat = int(np.argmax(m))
        if m.flat[flat] < threshold:
            break
        r, c = divmod(flat, m.shape[1])
        tp += 1
        m[r, :] = 0.0
        m[:, c] = 0.0
    return tp


def grec_f1(num_pred: int, num_gt: int, tp: int, gt_no_target: bool) -> float:
    """F1 of one sample: ``2TP / (2TP + FP + FN)``; a no-target sample scores 1 iff nothing is predicted."""
    if gt_no_target:
        return 0.0 if num_pred >= 1 else 1.0
    fp, fn = num_pred - tp, num_gt - tp
    return 2 * tp / (2 * tp + fp + fn)


def score_grec(es: EvalSet) -> TaskResult:
    """F1score (IoU and GIoU matching), N-acc, T-acc following gRefCOCO ``mdetr/datasets/refexp.py``
    (``RefExpEvaluator``, ``thresh_score=0.7``, ``thresh_iou=0.5``, ``thresh_F1=1.0``).

    * unit = GT target k with predicted ``[SEG]`` k (a record with no targets is one no-target unit);
      GT boxes are the target's boxes (or its instance masks' boxes); an empty target = no target;
    * predicted boxes: see :func:`grec_pred_boxes` (float32 score ≥ 0.7);
    * matching: :func:`greedy_match_count` on the pairwise overlap computed in float32, a pair counts
      if ≥ 0.5. The official code matches on GIoU (``f1score_giou``); ``f1score`` is the same procedure
      on IoU;
    * per unit F1 (:func:`grec_f1`); a unit is correct iff F1 ≥ 1.0; ``f1score*`` = share correct;
    * no-target GT: TP if no box survives else FN; target GT: TN if ≥ 1 box survives else FP;
      ``n_acc`` = TP / (TP + FN), ``t_acc`` = TN / (TN + FP) (keys left out, with a note, when a class
      is absent — the official code would divide by zero).
    """
    res = TaskResult(hist_label="per-sample F1 (IoU matching)")
    nt = {"TP": 0, "FN": 0, "TN": 0, "FP": 0}
    correct_iou = correct_giou = n = 0
    for gt, k, target, seg in gres_units(es):
        gt_boxes = target.instance_boxes()
        gt_nt = target.empty
        boxes = grec_pred_boxes(seg)
        num_pred, num_gt = len(boxes), len(gt_boxes)
        if gt_nt:
            outcome = "FN" if num_pred >= 1 else "TP"
            tp_iou = tp_giou = 0
        else:
            outcome = "TN" if num_pred >= 1 else "FP"
            tp_iou = greedy_match_count(R.box_iou_matrix(boxes, gt_boxes, dtype=GREC_OVERLAP_DTYPE))
            tp_giou = greedy_match_count(R.generalized_box_iou_matrix(boxes, gt_boxes, dtype=GREC_OVERLAP_DTYPE))
        nt[outcome] += 1
        f1_iou = grec_f1(num_pred, num_gt, tp_iou, gt_nt)
        f1_giou = grec_f1(num_pred, num_gt, tp_giou, gt_nt)
        correct_iou += f1_iou >= GREC_F1_THRESHOLD
        correct_giou += f1_giou >= GREC_F1_THRESHOLD
        n += 1
        res.per_sample.append(
            {"id": gt.id, "target": k, "gt_no_target": gt_nt, "n_pred_boxes": num_pred, "n_gt_boxes": num_gt, "tp_iou": tp_iou, "tp_giou": tp_giou, "f1_iou": f1_iou, "f1_giou": f1_giou, "outcome": outcome}
        )
        res.hist.append(f1_iou)
    res.counts.update(n_units=n, n_no_target=nt["TP"] + nt["FN"], n_target=nt["TN"] + nt["FP"], **{f"n_{k.lower()}": v for k, v in nt.items()})
    res.metrics["f1score"] = correct_iou / n
    res.metrics["f1score_giou"] = correct_giou / n
    if nt["TP"] + nt["FN"]:
        res.metrics["n_acc"] = nt["TP"] / (nt["TP"] + nt["FN"])
    else:
        res.notes.append("n_acc not reported: no no-target units")
    if nt["TN"] + nt["FP"]:
        res.metrics["t_acc"] = nt["TN"] / (nt["TN"] + nt["FP"])
    else:
        res.notes.append("t_acc not reported: no units with a target")
    return res
