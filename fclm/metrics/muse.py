"""MUSE (PixelLM's multi-target reasoning segmentation benchmark)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import rle as R
from .io import EvalSet
from .res import LISA_CIOU_EPS, lisa_iou
from .result import TaskResult

_POS1 = math.log1p(math.exp(-1.0))  # BCE-with-logits(x=1, y=1) = softplus(-1)
_NEG1 = math.log1p(math.exp(1.0))  # BCE-with-logits(x=1, y=0) = softplus(1)
_LOG2 = math.log(2.0)  # BCE-with-logits(x=0, y=·)
_SIG1 = 1.0 / (1.0 + math.exp(-1.0))  # sigmoid(1); sigmoid(0) = 0.5


def pixellm_match_cost(inter: np.ndarray, pred_area: np.ndarray, tgt_area: np.ndarray, hw: int) -> np.ndarray:
    """PixelLM ``utils/matcher.py::match_pred`` cost (sigmoid CE + dice, weights 1 and 1), P×T.

    PixelLM feeds predicted mask *logits*, sampled at 12,544 random points; here the logit is the
    binary predicted mask itself (1.0 on predicted pixels, 0.0 elsewhere), evaluated on every pixel,
    which makes matching deterministic. With binary inputs the sums reduce to pixel counts —
    intersection ``I``, predicted area ``P``, target area ``T``, image size ``hw``:

    * CE   = [I·sp(−1) + (T−I)·ln2 + (P−I)·sp(1) + (hw−P−T+I)·ln2] / hw   (sp = softplus);
    * dice = 1 − (2[I·σ(1) + (T−I)/2] + 1) / (P·σ(1) + (hw−P)/2 + T + 1).
    """
    inter = np.asarray(inter, dtype=np.float64)
    p = np.asarray(pred_area, dtype=np.float64)[:, None]
    t = np.asarray(tgt_area, dtype=np.float64)[None, :]
    ce = (inter * _POS1 + (t - inter) * _LOG2 + (p - inter) * _NEG1 + (hw - p - t + inter) * _LOG2) / hw
    numerator = 2.0 * (inter * _SIG1 + (t - inter) * 0.5)
    denominator = p * _SIG1 + (hw - p) * 0.5 + t
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return ce + dice


def match_question(preds: list[Optional[R.Rle]], tgts: list[Optional[R.Rle]], hw: int) -> list[tuple[Optional[int], Optional[int]]]:
    """Pairs ``(pred index | None, target index | None)`` of one question, in PixelLM's order.

    Hungarian matching (``scipy.optimize.linear_sum_assignment``) on :func:`pixellm_match_cost`;
    then every unmatched target (paired with an empty prediction), then every unmatched prediction
    (paired with an empty target), as in ``train_ds.py::ar_validate``.
    """
    if preds and tgts:
        inter = R.pairwise_intersection(preds, tgts)
        cost = pixellm_match_cost(inter, np.array([R.area(m) for m in preds]), np.array([R.area(m) for m in tgts]), hw)
        rows, cols = linear_sum_assignment(cost)
    else:
        rows, cols = np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    pairs: list[tuple[Optional[int], Optional[int]]] = [(int(r), int(c)) for r, c in zip(rows, cols)]
    pairs += [(None, j) for j in range(len(tgts)) if j not in set(cols.tolist())]
    pairs += [(i, None) for i in range(len(preds)) if i not in set(rows.tolist())]
    return pairs


def score_muse(es: EvalSet) -> TaskResult:
    """gIoU and cIoU following PixelLM ``train_ds.py::ar_validate`` with ``utils/matcher.py::match_pred``.

    * one record per question; its targets are the question's objects; each predicted ``[SEG]`` is one
      mask (its union; a no-target ``[SEG]`` is an empty mask); predictions are **not** padded to the
      number of targets;
    * per question :func:`match_question`; each pair's IoU = ``I / (U + 1e-5)``, 1 when ``U = 0``;
    * an image is the set of records sharing ``image``; ``giou`` = Σ pair IoU ÷ Σ over images of
      max(#predicted masks, #targets) (PixelLM's ``max_num`` over the image's questions);
      ``ciou`` = ΣI / (ΣU + 1e-10).
    """
    res = TaskResult(hist_label="per-pair IoU (matched and unmatched masks)")
    images: dict[str, dict] = {}
    sum_i = sum_u = 0
    for gt, pred in es.pairs:
        preds = [s.target_mask for s in pred.segs]
        tgts = [t.mask for t in gt.targets]
        hw = gt.size[0] * gt.size[1] if gt.size else 1
        rows = []
        q_iou = 0.0
        for pi, ti in match_question(preds, tgts, hw):
            i, u = R.inter_union(preds[pi] if pi is not None else None, tgts[ti] if ti is not None else None)
            iou = lisa_iou(i, u)
            sum_i += i
            sum_u += u
            q_iou += iou
            rows.append({"pred": pi, "target": ti, "i": i, "u": u, "iou": iou})
            res.hist.append(iou)
        img = images.setdefault(gt.image, {"iou": 0.0, "n_pred": 0, "n_target": 0})
        img["iou"] += q_iou
        img["n_pred"] += len(preds)
        img["n_target"] += len(tgts)
        res.per_sample.append({"id": gt.id, "image": gt.image, "n_pred": len(preds), "n_target": len(tgts), "sum_iou": q_iou, "pairs": rows})
    denom = sum(max(v["n_pred"], v["n_target"]) for v in images.values())
    res.counts.update(n_questions=len(es.pairs), n_images=len(images), n_pairs=len(res.hist), n_pred_masks=sum(v["n_pred"] for v in images.values()), n_target_masks=sum(v["n_target"] for v in images.values()))
    if denom:
        res.metrics["giou"] = sum(v["iou"] for v in images.values()) / denom
        res.metrics["ciou"] = sum_i / (sum_u + LISA_CIOU_EPS)
    else:
        res.notes.append("giou/ciou not reported: no targets and no predicted masks")
    return res
