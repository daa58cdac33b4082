"""GRES (ReLA), Ref-ZOM (RIS-DMMI) and R-RefCOCO (robust-ref-seg) on hand-computed cases."""

from __future__ import annotations

import pytest
from metrics_testkit import eval_set, gt, pred, rect, seg

from fclm.metrics import score_gres, score_refzom, score_rrefcoco
from fclm.metrics.io import EvalInputError

A = rect(0, 0, 4, 5)  # 20 px
B = rect(2, 0, 6, 5)  # 20 px; with A: I = 10, U = 30


def test_gres_relas_four_cases(tmp_path):
    es = eval_set(
        tmp_path,
        [gt("u1", [[]]), gt("u2", [[]]), gt("u3", [[A]]), gt("u4", [[A]]), gt("u5", [[A]]), gt("u6", [[A]])],
        [
            pred("u1", [seg(rect(0, 0, 2, 2), exists=0.2)]),  # GT empty, predicted no-target → TP, IoU 1, adds nothing
            pred("u2", [seg(rect(0, 0, 2, 3))]),  # GT empty, predicted target → FN, IoU 0, U += 6
            pred("u3", [seg(B, exists=0.3)]),  # target, predicted no-target → FP: I = 0 but U = |B ∪ A| = 30 kept
            pred("u4", [seg(A)]),  # TN, IoU 1
            pred("u5", [seg(B)]),  # TN, IoU 1/3
            pred("u6", []),  # missing [SEG] → predicted no-target → FP, U = 20
        ],
    )
    r = score_gres(es)
    assert [row["outcome"] for row in r.per_sample] == ["TP", "FN", "FP", "TN", "TN", "FP"]
    assert [(row["i"], row["u"]) for row in r.per_sample] == [(0, 0), (0, 6), (0, 30), (20, 20), (10, 30), (0, 20)]
    m = r.metrics
    assert m["giou"] == pytest.approx((1 + 0 + 0 + 1 + 1 / 3 + 0) / 6)
    assert m["ciou"] == pytest.approx(30 / 106)
    assert m["n_acc"] == pytest.approx(1 / 2)
    assert m["t_acc"] == pytest.approx(2 / 4)
    assert m["pr_07"] == m["pr_08"] == m["pr_09"] == pytest.approx(1 / 4)
    assert r.counts["n_no_target"] == 2 and r.counts["n_target"] == 4


def test_gres_record_without_targets_is_one_no_target_unit(tmp_path):
    rec = gt("a")
    es = eval_set(tmp_path, [rec, gt("b", [[A]])], [pred("a", []), pred("b", [seg(A)])])
    r = score_gres(es)
    assert r.per_sample[0]["outcome"] == "TP" and r.metrics["giou"] == 1.0


def test_gres_without_no_target_units_omits_n_acc(tmp_path):
    es = eval_set(tmp_path, [gt("a", [[A]])], [pred("a", [seg(B)])])
    r = score_gres(es)
    assert "n_acc" not in r.metrics and r.metrics["t_acc"] == 1.0
    assert any(n.startswith("n_acc not reported") for n in r.notes)


def test_refzom_zero_one_many(tmp_path):
    es = eval_set(
        tmp_path,
        [gt("z1", [[]]), gt("z2", [[]]), gt("z3", [[]]), gt("o1", [[A]]), gt("m1", [[rect(0, 0, 2, 2), rect(5, 5, 7, 7)]])],
        [
            pred("z1", []),  # empty → correct
            pred("z2", [seg(rect(0, 0, 2, 2))]),  # any pixel → wrong
            pred("z3", [seg(rect(0, 0, 2, 2), exists=0.1)]),  # no-target [SEG] = empty → correct
            pred("o1", [seg(B)]),  # I 10, U 30
            pred("m1", [seg(rect(0, 0, 2, 2))]),  # I 4, U 8
        ],
    )
    r = score_refzom(es)
    assert [row["category"] for row in r.per_sample] == ["zero", "zero", "zero", "one", "many"]
    assert r.metrics["acc"] == pytest.approx(2 / 3)
    assert r.metrics["miou"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert r.metrics["oiou"] == pytest.approx(14 / 38)
    assert r.counts == {"n_sentences": 5, "n_zero": 3, "n_one": 1, "n_many": 1}


def test_rrefcoco_per_ref_means_and_refs_without_negatives_or_positives(tmp_path):
    def rec(rid, masks, ref):
        return gt(rid, [masks], task="gres", meta={"ref_id": ref})

    es = eval_set(
        tmp_path,
        [
            rec("s1", [A], 1), rec("s2", [A], 1), rec("s3", [], 1), rec("s4", [], 1),  # ref 1: 2 positives, 2 negatives
            rec("s5", [A], "r2"),  # ref "r2": positives only
            rec("s6", [], 3), rec("s7", [], 3),  # ref 3: negatives only
        ],
        [
            pred("s1", [seg(B)]),  # I 10, U 30
            pred("s2", [seg(A)]),  # I 20, U 20
            pred("s3", [seg(rect(0, 0, 2, 3))]),  # FP, area 6 → added to ref 1's U
            pred("s4", []),  # TN
            pred("s5", []),  # I 0, U 20
            pred("s6", [seg(rect(0, 0, 2, 2), exists=0.2)]),  # use_exist: empty → TN
            pred("s7", [seg(rect(0, 0, 2, 2))]),  # FP
        ],
    )  # fmt: skip
    r = score_rrefcoco(es)
    m = r.metrics
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["riou"] == pytest.approx((30 / 56 + 0 / 20) / 2)
    assert m["miou"] == pytest.approx(((1 / 3 + 1) / 2 + 0) / 2)
    assert m["oiou"] == pytest.approx(30 / 70)
    assert r.counts["n_refs"] == 3 and r.counts["n_refs_without_negatives"] == 1 and r.counts["n_refs_without_positives"] == 1
    assert any("1 ref(s) without negative sentences" in n for n in r.notes)
    assert any("1 ref(s) without positive sentences" in n for n in r.notes)


def test_rrefcoco_needs_ref_id(tmp_path):
    es = eval_set(tmp_path, [gt("s1", [[A]])], [pred("s1")])
    with pytest.raises(EvalInputError, match=r"id 's1'.*meta.ref_id"):
        score_rrefcoco(es)
