"""GREC F1score (IoU and GIoU matching), N-acc, T-acc (gRefCOCO refexp.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_testkit import eval_set, gt, pred, rect, seg
from torchvision.ops import box_iou, generalized_box_iou

from fclm.metrics import score_grec
from fclm.metrics.grec import greedy_match_count, grec_f1
from fclm.metrics.rle import box_iou_matrix, generalized_box_iou_matrix

G = [0, 0, 10, 10]
NEAR = [1.8, 1.8, 11.8, 11.8]  # IoU 0.5065 ≥ 0.5 but GIoU 0.4600 < 0.5


def test_box_overlaps_match_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, size=(12, 2))
    wh = rng.uniform(1, 30, size=(12, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    a, b = boxes[:5], boxes[5:]
    ta, tb = torch.tensor(a), torch.tensor(b)
    np.testing.assert_allclose(box_iou_matrix(a, b), box_iou(ta, tb).numpy(), atol=1e-12)
    np.testing.assert_allclose(generalized_box_iou_matrix(a, b), generalized_box_iou(ta, tb).numpy(), atol=1e-12)
    assert box_iou_matrix(np.array(NEAR), np.array(G))[0, 0] == pytest.approx(0.5065, abs=1e-4)
    assert generalized_box_iou_matrix(np.array(NEAR), np.array(G))[0, 0] == pytest.approx(0.4600, abs=1e-4)


def test_greedy_matching_is_greedy_not_hungarian_and_breaks_ties_row_major():
    assert greedy_match_count(np.array([[0.9, 0.6], [0.8, 0.1]])) == 1  # Hungarian would find 2
    assert greedy_match_count(np.array([[0.7, 0.7], [0.7, 0.0]])) == 1  # tie → (0, 0), leaving 0.0
    assert greedy_match_count(np.array([[0.7, 0.6], [0.55, 0.0]])) == 1
    assert greedy_match_count(np.array([[0.4, 0.9], [0.8, 0.0]])) == 2
    assert greedy_match_count(np.zeros((0, 3))) == 0
    assert grec_f1(2, 3, 1, False) == pytest.approx(2 / (2 + 1 + 2))  # TP 1, FP 1, FN 2
    assert grec_f1(0, 0, 0, True) == 1.0 and grec_f1(1, 0, 0, True) == 0.0


def test_grec_hand_computed(tmp_path):
    far = [20, 20, 30, 30]
    es = eval_set(
        tmp_path,
        [
            gt("g1", [[]], boxes=[[G]]),
            gt("g2", [[]], boxes=[[G]]),
            gt("g3", [[]], boxes=[[G, far]]),
            gt("g4", [[]]),  # no target
            gt("g5", [[]]),  # no target
            gt("g6", [[]], boxes=[[G]]),
        ],
        [
            pred("g1", [seg(boxes=[G], scores=[0.9])]),  # exact → correct
            pred("g2", [seg(boxes=[NEAR], scores=[0.95])]),  # correct by IoU, not by GIoU
            pred("g3", [seg(boxes=[G, far], scores=[0.9, 0.6])]),  # 0.6 dropped → TP 1, FN 1 → F1 2/3
            pred("g4", [seg(boxes=[G], scores=[0.5])]),  # dropped → nothing survives → correct (TP)
            pred("g5", [seg(boxes=[G], scores=[0.8])]),  # a box survives → FN
            pred("g6", []),  # missing → no box → FP
        ],
        need_masks=False,
    )
    r = score_grec(es)
    assert [row["f1_iou"] for row in r.per_sample] == pytest.approx([1, 1, 2 / 3, 1, 0, 0])
    assert [row["f1_giou"] for row in r.per_sample] == pytest.approx([1, 0, 2 / 3, 1, 0, 0])
    assert [row["outcome"] for row in r.per_sample] == ["TN", "TN", "TN", "TP", "FN", "FP"]
    assert r.metrics["f1score"] == pytest.approx(3 / 6)
    assert r.metrics["f1score_giou"] == pytest.approx(2 / 6)
    assert r.metrics["n_acc"] == pytest.approx(1 / 2)
    assert r.metrics["t_acc"] == pytest.approx(3 / 4)


def test_grec_boxes_from_masks_missing_score_and_no_target_seg(tmp_path):
    es = eval_set(
        tmp_path,
        [gt("a", [[rect(0, 0, 4, 4)]]), gt("b", [[]])],
        [pred("a", [seg(rect(0, 0, 4, 4))]), pred("b", [seg(rect(0, 0, 4, 4), exists=0.1, scores=[0.99])])],
        need_masks=False,
    )
    r = score_grec(es)
    # "a": no score → kept, box from mask equals GT box from mask; "b": exists < 0.5 → no box survives
    assert r.per_sample[0]["tp_iou"] == 1 and r.per_sample[1]["outcome"] == "TP"
    assert r.metrics["f1score"] == 1.0
