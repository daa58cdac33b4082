"""Thresholds compared in the official code's number type, with hand-built cases exactly at the threshold.

* gRefCOCO GREC (``mdetr/datasets/refexp.py``): scores come from a float32 tensor (``.tolist()``) and are
  compared with 0.7 as Python floats, so a score written as 0.7 is float32 0.69999999 and dropped;
  boxes are float32 tensors and GIoU ≥ 0.5 is decided in float32.
* REC: box IoU of float32 tensors (torchvision ``box_iou``), ≥ 0.5.
* ``exists`` (R-RefCOCO ``exist_pred < 0.5`` on a float32 tensor; ReLA's argmax of float32 logits):
  decided on the float32 value.
* GRES Pr@0.7/0.8/0.9 and Ref-ZOM / R-RefCOCO IoUs: ReLA and RIS-DMMI divide numpy integer pixel
  counts in float64 — unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_testkit import eval_set, gt, pred, rect, seg
from torchvision.ops import box_iou, generalized_box_iou

from fclm.metrics import score_grec, score_gres, score_rec, score_res, score_rrefcoco
from fclm.metrics.rle import box_iou_matrix, generalized_box_iou_matrix

A = rect(0, 0, 4, 5)
# Boxes whose IoU / GIoU is ≥ 0.5 in float64 but < 0.5 in float32 (searched over a 0.1 grid):
IOU_PRED, IOU_GT = [0.0, 0.0, 0.4, 2.5], [0.0, 0.0, 0.7, 2.0]  # IoU 0.5000000000000001 vs 0.49999997
GIOU_PRED, GIOU_GT = [0.0, 0.0, 0.4, 3.5], [0.0, 0.0, 0.7, 4.0]  # GIoU 0.5000000000000001 vs 0.49999997


def test_the_threshold_cases_are_what_they_claim():
    f64 = lambda b: torch.tensor([b], dtype=torch.float64)  # noqa: E731
    f32 = lambda b: torch.tensor([b])  # noqa: E731  (float32, as the official code builds them)
    assert box_iou(f64(IOU_PRED), f64(IOU_GT)).item() >= 0.5 > box_iou(f32(IOU_PRED), f32(IOU_GT)).item()
    assert generalized_box_iou(f64(GIOU_PRED), f64(GIOU_GT)).item() >= 0.5 > generalized_box_iou(f32(GIOU_PRED), f32(GIOU_GT)).item()
    assert torch.tensor([0.7]).tolist()[0] < 0.7 <= torch.tensor([0.70000005]).tolist()[0]


def test_float32_box_overlaps_equal_torchvision_float32_bit_for_bit():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, size=(40, 2))
    wh = rng.uniform(0.1, 300, size=(40, 2))
    boxes = np.round(np.concatenate([xy, xy + wh], axis=1), 1)
    a, b = boxes[:15], boxes[15:]
    ta, tb = torch.tensor(a.tolist()), torch.tensor(b.tolist())
    assert np.array_equal(box_iou_matrix(a, b, dtype=np.float32), box_iou(ta, tb).numpy())
    assert np.array_equal(generalized_box_iou_matrix(a, b, dtype=np.float32), generalized_box_iou(ta, tb).numpy())


def test_grec_score_exactly_0_7_is_dropped_as_in_float32(tmp_path):
    box = [0, 0, 4, 5]
    es = eval_set(
        tmp_path,
        [gt("a", [[A]], boxes=[[box]], task="grec"), gt("b", [[A]], boxes=[[box]], task="grec"), gt("c", [[A]], boxes=[[box]], task="grec")],
        [pred("a", [seg(A, scores=[0.7], boxes=[box])]), pred("b", [seg(A, scores=[0.70000005], boxes=[box])]), pred("c", [seg(A, scores=[0.6999999999], boxes=[box])])],
        need_masks=False,
    )
    rows = score_grec(es).per_sample
    # 0.7 → float32 0.699999988 < 0.7: dropped (F1 0, counted as "no box" = FP); 0.70000005 → 0.70000005: kept.
    assert [r["n_pred_boxes"] for r in rows] == [0, 1, 0]
    assert [r["outcome"] for r in rows] == ["FP", "TN", "FP"]


def test_grec_giou_match_at_0_5_is_decided_in_float32(tmp_path):
    es = eval_set(tmp_path, [gt("a", [[A]], boxes=[[GIOU_GT]], task="grec")], [pred("a", [seg(boxes=[GIOU_PRED], scores=[0.9])])], need_masks=False)
    row = score_grec(es).per_sample[0]
    assert row["tp_giou"] == 0 and row["f1_giou"] == 0.0  # float64 would match (GIoU 0.5000000000000001)
    es = eval_set(tmp_path, [gt("a", [[A]], boxes=[[IOU_GT]], task="grec")], [pred("a", [seg(boxes=[IOU_PRED], scores=[0.9])])], need_masks=False, name="y")
    assert score_grec(es).per_sample[0]["tp_iou"] == 0


def test_rec_iou_at_0_5_is_decided_in_float32(tmp_path):
    es = eval_set(tmp_path, [gt("a", [[A]], boxes=[[IOU_GT]], task="rec"), gt("b", [[A]], boxes=[[[0, 0, 2, 1]]], task="rec")],
                  [pred("a", [seg(boxes=[IOU_PRED])]), pred("b", [seg(boxes=[[0, 0, 1, 1]])])], need_masks=False)  # fmt: skip
    rows = score_rec(es).per_sample
    assert [r["hit"] for r in rows] == [False, True]  # float64: 0.5000000000000001 (hit); exactly 0.5 is a hit
    assert rows[0]["box_iou"] == pytest.approx(0.5, abs=1e-7) and rows[0]["box_iou"] < 0.5


def test_rec_top_box_ranks_float32_scores_ties_keep_order(tmp_path):
    # 0.9 and 0.9000000001 are the same float32: a tie, so the first instance wins (float64 would pick the second)
    es = eval_set(tmp_path, [gt("a", [[A]], boxes=[[[0, 0, 4, 5]]], task="rec")],
                  [pred("a", [seg(boxes=[[0, 0, 4, 5], [6, 6, 9, 9]], scores=[0.9, 0.9000000001])])], need_masks=False)  # fmt: skip
    assert score_rec(es).per_sample[0]["hit"] is True


@pytest.mark.parametrize("exists, no_target", [(0.5, False), (0.49999999999, False), (0.4999999, True), (0.5000001, False)])
def test_exists_threshold_is_float32(tmp_path, exists, no_target):
    """0.49999999999 is 0.5 in float32: the official ``exist_pred < 0.5`` keeps the mask."""
    es = eval_set(tmp_path, [gt("a", [[A]], task="gres")], [pred("a", [seg(A, exists=exists)])])
    assert es.pairs[0][1].segs[0].no_target is no_target
    assert score_gres(es).per_sample[0]["pred_no_target"] is no_target
    assert score_res(es).per_sample[0]["iou"] == pytest.approx(0.0 if no_target else 1.0, abs=1e-5)
    meta = {"ref_id": 1}
    es = eval_set(tmp_path, [gt("a", [[A]], meta=meta), gt("n", [[]], meta=meta)], [pred("a", [seg(A, exists=exists)]), pred("n", [seg(A, exists=exists)])], name="r")
    rr = score_rrefcoco(es)
    assert rr.metrics["mrr"] == (1.0 if no_target else 0.0)


def test_gres_precision_at_exactly_0_7_counts_as_reled(tmp_path):
    """ReLA: ``float(I) / float(U) >= .7`` in float64; 7/10 is exactly 0.7 there."""
    g = rect(0, 0, 10, 1)  # 10 pixels
    p = rect(0, 0, 7, 1)  # 7 of them: I 7, U 10
    es = eval_set(tmp_path, [gt("a", [[g]], task="gres")], [pred("a", [seg(p)])])
    res = score_gres(es)
    assert res.per_sample[0]["iou"] == 0.7 and res.metrics["pr_07"] == 1.0 and res.metrics["pr_08"] == 0.0
