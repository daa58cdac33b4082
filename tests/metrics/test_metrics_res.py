"""RES / DL-RES gIoU, cIoU (LISA) and REC Acc@0.5, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from metrics_testkit import eval_set, gt, pred, rect, seg

from fclm.metrics import score_rec, score_res
from fclm.metrics.io import EvalInputError

EPS = 1e-5  # LISA: I / (U + 1e-5)


def test_res_hand_computed(tmp_path):
    A = rect(0, 0, 4, 5)  # 20 px
    B = rect(2, 0, 6, 5)  # 20 px, I = 10 with A, U = 30
    es = eval_set(
        tmp_path,
        [gt("a", [[A]]), gt("b", [[A]]), gt("c", [[]]), gt("d", [[A], [B]])],
        [
            pred("a", [seg(B)]),  # IoU 10/30
            pred("b", []),  # missing [SEG] → empty mask: I 0, U 20
            pred("c", []),  # empty GT and empty prediction: U = 0 → IoU 1
            pred("d", [seg(A), seg(A), seg(B)]),  # target 0: IoU 1; target 1: 10/30; extra [SEG] ignored
        ],
    )
    r = score_res(es)
    ious = [10 / (30 + EPS), 0.0, 1.0, 20 / (20 + EPS), 10 / (30 + EPS)]
    assert r.metrics["giou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert r.metrics["ciou"] == pytest.approx((10 + 0 + 0 + 20 + 10) / (30 + 20 + 0 + 20 + 30), abs=1e-9)
    assert r.counts == {"n_units": 5, "n_missing_seg": 2, "n_extra_seg": 1, "n_records_without_targets": 0}
    assert [row["missing_seg"] for row in r.per_sample] == [False, True, True, False, False]


def test_res_no_target_seg_is_an_empty_mask(tmp_path):
    A = rect(0, 0, 4, 5)
    es = eval_set(tmp_path, [gt("a", [[A]]), gt("b", [[]])], [pred("a", [seg(A, exists=0.2)]), pred("b", [seg(A, exists=0.1)])])
    r = score_res(es)
    assert [row["iou"] for row in r.per_sample] == [0.0, 1.0]
    assert r.metrics["ciou"] == pytest.approx(0.0)


def test_res_union_of_instances(tmp_path):
    # GT target = union of two instances; predicted [SEG] = union of its instances.
    es = eval_set(tmp_path, [gt("a", [[rect(0, 0, 2, 2), rect(5, 5, 7, 7)]])], [pred("a", [seg(rect(0, 0, 2, 2), rect(5, 5, 6, 7))])])
    r = score_res(es)
    assert r.per_sample[0]["i"] == 6 and r.per_sample[0]["u"] == 8


def test_rec_top_scoring_box_and_ties(tmp_path):
    box = [0, 0, 4, 4]
    es = eval_set(
        tmp_path,
        [gt("a", [[]], boxes=[[box]]), gt("b", [[]], boxes=[[box]]), gt("c", [[]], boxes=[[box]]), gt("d", [[]], boxes=[[box]]), gt("e", [[]], boxes=[[box]])],
        [
            pred("a", [seg(boxes=[[6, 6, 9, 9], [0, 0, 4, 3]], scores=[0.2, 0.9])]),  # top box IoU 12/16 → hit
            pred("b", [seg(boxes=[[6, 6, 9, 9], [0, 0, 4, 4]], scores=[0.9, 0.2])]),  # top box misses
            pred("c", [seg(boxes=[[0, 0, 4, 2], [0, 0, 4, 4]], scores=[0.5, 0.5])]),  # tie → first: IoU 0.5 → hit (≥)
            pred("d", []),  # missing [SEG] → miss
            pred("e", [seg(boxes=[[0, 0, 4, 4]], exists=0.3)]),  # no-target [SEG] → miss
        ],
        need_masks=False,
    )
    r = score_rec(es)
    assert [row["hit"] for row in r.per_sample] == [True, False, True, False, False]
    assert r.per_sample[0]["box_iou"] == pytest.approx(0.75)
    assert r.per_sample[2]["box_iou"] == pytest.approx(0.5)
    assert r.metrics == {"acc_05": pytest.approx(0.4)}
    assert any("mask giou/ciou not reported" in n for n in r.notes)


def test_rec_boxes_from_masks_and_mask_metrics(tmp_path):
    A = rect(0, 0, 4, 4)
    es = eval_set(tmp_path, [gt("a", [[A]])], [pred("a", [seg(rect(0, 0, 4, 2))])], need_masks=False)
    r = score_rec(es)
    assert r.per_sample[0]["box_iou"] == pytest.approx(0.5) and r.metrics["acc_05"] == 1.0
    assert r.metrics["giou"] == pytest.approx(8 / (16 + EPS))


def test_rec_rejects_several_gt_boxes(tmp_path):
    es = eval_set(tmp_path, [gt("a", [[]], boxes=[[[0, 0, 1, 1], [2, 2, 3, 3]]])], [pred("a")], need_masks=False)
    with pytest.raises(EvalInputError, match=r"id 'a'.*REC target 0 has 2 boxes"):
        score_rec(es)
